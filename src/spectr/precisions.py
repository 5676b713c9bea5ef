"""Precision modes: their names and the default, in one torch-free place (the CLI reads it for --help).

native runs a model's weights as its file stores them (a GGUF's own quantization;
bf16 for a transformers folder); fp32 / bf16 run dense weights; int8 / int4
re-quantize the weights. `spectr.models.quantize` implements them.
"""

PRECISIONS = ("native", "fp32", "bf16", "int8", "int4")
DEFAULT_PRECISION = "native"
