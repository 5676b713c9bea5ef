"""Precision modes: their names and the default, in one torch-free place (the CLI reads it for --help).

native runs a model's weights as its file stores them (a GGUF's own quantization;
bf16 for a transformers folder); fp32 / bf16 run dense weights; int8 / int4
re-quantize the weights. `spectr.models.quantize` implements them.
"""

PRECISIONS = ("native", "fp32", "bf16", "int8", "int4")
DEFAULT_PRECISION = "native"
# A trained draft head runs re-quantized to 4 bits on spectr's block kernel unless told otherwise: its
# dense weights (and the 12k-row head it borrows from the target) cost 4.5 ms a depth in bf16 and 2.0 ms
# at int4 here, for the same acceptance (0.294 vs 0.290 ± 0.009 at depth 1, T = 1, chat prompts). Its
# precision never touches exactness: verification uses whatever law the draft sampled from.
DEFAULT_DRAFT_PRECISION = "int4"
