"""Precision modes: their names and the default, in one torch-free place (the CLI reads it for --help).

native runs a model's weights as its file stores them (a GGUF's own quantization;
bf16 for a transformers folder), with each linear layer's input quantized to int8 per
block of 32 (scale max|x| / 127), the scheme llama.cpp computes these files with
(its Q8 activations); native-int16 keeps the same weights with int16 activations,
~1e-5 from float32, at about twice the cost of each row beyond the first. fp32 / bf16
run dense weights; int8 / int4 re-quantize the weights. `spectr.models.quantize`
implements them.
"""

PRECISIONS = ("native", "native-int16", "fp32", "bf16", "int8", "int4")
DEFAULT_PRECISION = "native"
# The modes that run a file's weights as stored, and the bits of their activations on spectr's kernel.
# Measured on the default target (next-token laws over 200 tokens vs float32 over the same weights, mean
# TV): native 0.017, native-int16 0.0001 (bf16 on dense weights: 0.011); a forward over 8 new tokens
# costs 1.4-1.7x one token under native and 2.1-3.0x under native-int16 (every extra row's integer dots
# halve with int8: one VNNI instruction per 4 inputs instead of two).
STORED_ACTIVATION_BITS = {"native": 8, "native-int16": 16}
# A trained draft head runs re-quantized to 4 bits on spectr's block kernel unless told otherwise: its
# dense weights (and the 12k-row head it borrows from the target) cost 4.5 ms a depth in bf16 and 2.0 ms
# at int4 here, for the same acceptance (0.294 vs 0.290 ± 0.009 at depth 1, T = 1, chat prompts). Its
# precision never touches exactness: verification uses whatever law the draft sampled from.
DEFAULT_DRAFT_PRECISION = "int4"
