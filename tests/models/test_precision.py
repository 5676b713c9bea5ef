"""Each lower precision computes what fp32 computes over the weights it stores, to within bf16 arithmetic.

The guard compares a mode against fp32 arithmetic over that mode's own rounded
weights, not over the original ones: int4 rounds the weights by ~8% (rms), which buries
a 2% error of the kernel or the loading (TV against the original fp32 moves by
under 4%), while against its own weights every mode is as close as bf16 arithmetic.
"""

import copy

import pytest
import torch

from spectr.models import native_forward
from spectr.models.llama import rotary_tables
from spectr.models import kernels
from spectr.models.quantize import BLOCK_SIZE, BlockQuantized
from tests.models.tiny import VOCAB, tiny_model

# Mean total variation of the next-token distributions over the 64 tokens below, measured over model
# seeds 0-4 and token seeds 1-3: bf16 5.4e-3–6.2e-3, int8 5.5e-3–6.3e-3, int4 5.8e-3–6.3e-3 (all three
# run bf16 arithmetic; what sets them apart, the weights' rounding, is in the reference). Limit: ~2x that.
# On spectr's block kernel int4 runs float32 activations (int16 within each block's dot): 9.9e-5.
TOLERANCE = {"bf16": 0.012, "int8": 0.012, "int4": 3e-4 if kernels.available() else 0.012}

# Positions spread over the whole context: a wrong rotary base shows in proportion to the position.
TOKENS = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(1))
POSITIONS = torch.arange(64) * 4


@pytest.fixture(scope="module")
def hf_model():
    # Every linear is int4-shaped (no int8 fallback). The default init (0.02) leaves attention near
    # uniform, so positions would barely matter; untied, so the head is quantised and the embedding not.
    return tiny_model("llama-gqa", hidden_size=128, intermediate_size=256, initializer_range=0.1,
                      tie_word_embeddings=False)


def precision_error(reference, lowered) -> float:
    """Mean total variation between the next-token distributions of two forwards over TOKENS."""
    expected, got = (torch.softmax(lm.forward(TOKENS, POSITIONS, lm.new_cache(TOKENS.shape[1])).logits, -1)
                     for lm in (reference, lowered))
    return float((expected - got).abs().sum(-1).mean() / 2)


def _as_stored(name: str, weight: torch.Tensor, precision: str) -> torch.Tensor:
    """`weight` as `precision` stores it, in fp32: quantize.py's schemes, their scales in bf16."""
    if precision == "int4" and kernels.available():  # spectr's block kernel: float32 scales and activations
        return weight if weight.ndim == 1 or name == "model.embed_tokens.weight" else (
            BlockQuantized.quantize(weight).dequantize())
    if precision == "bf16" or weight.ndim == 1 or name == "model.embed_tokens.weight":
        return weight.bfloat16().float()  # norms, biases and the embedding are bf16 in every lower mode
    if precision == "int8":  # symmetric, per output channel
        scales = weight.abs().amax(-1, keepdim=True) / 127
        return (weight / scales).round() * scales.bfloat16().float()
    groups = weight.reshape(len(weight), -1, BLOCK_SIZE)  # int4: asymmetric, groups along the input
    low = groups.amin(-1, keepdim=True)
    scales = (groups.amax(-1, keepdim=True) - low) / 15
    codes = ((groups - low) / scales).round()
    zeros = low + 8 * scales  # the kernel dequantises (code - 8)·scale + zero
    return ((codes - 8) * scales.bfloat16().float() + zeros.bfloat16().float()).reshape(weight.shape)


def _mapped(hf_model, change):
    """A copy of the model with each parameter replaced by change(name, parameter)."""
    changed = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, parameter in changed.named_parameters():
            parameter.copy_(change(name, parameter))
    return changed


def reference(hf_model, precision: str):
    """fp32 arithmetic over the weights `precision` stores: what that mode is checked against."""
    return native_forward(_mapped(hf_model, lambda name, weight: _as_stored(name, weight, precision)), "fp32")


@pytest.fixture(scope="module")
def references(hf_model):
    return {precision: reference(hf_model, precision) for precision in TOLERANCE}


@pytest.mark.parametrize("precision", TOLERANCE)
def test_precision_modes_compute_what_fp32_computes_on_their_weights(hf_model, references, precision):
    error = precision_error(references[precision], native_forward(hf_model, precision))
    assert 0 < error < TOLERANCE[precision]  # above 0: it really ran in a lower precision


def _scaled_weights(hf_model, precision: str):
    # Before quantising: a 2% error of whatever produces the weights (loading, a scale, a kernel).
    scaled = _mapped(hf_model, lambda name, weight: weight * 1.02 if weight.ndim == 2 else weight)
    return native_forward(scaled, precision)


def _dropped_layer(hf_model, precision: str):
    lm = native_forward(hf_model, precision)
    del lm.layers[1]  # the cache keeps a slot for it, unused
    return lm


def _wrong_rotary_base(hf_model, precision: str):
    lm = native_forward(hf_model, precision)
    config = copy.deepcopy(hf_model.config)
    rope = config.rope_parameters
    config.rope_parameters = {**rope, "rope_theta": rope["rope_theta"] * 1.03}
    lm.cos, lm.sin = rotary_tables(config, lm.config.context_length)
    return lm


# The mean TV each causes (model seeds 0-4, each precision): weights x1.02 2.3e-2–2.8e-2,
# rotary base +3% 2.2e-2–3.0e-2, a dropped layer 0.31–0.34: each at least ~1.9x the limit.
@pytest.mark.parametrize(
    "fault", [_scaled_weights, _dropped_layer, _wrong_rotary_base], ids=lambda fault: fault.__name__[1:]
)
@pytest.mark.parametrize("precision", TOLERANCE)
def test_the_precision_guard_catches_planted_faults(hf_model, references, precision, fault):
    assert precision_error(references[precision], fault(hf_model, precision)) > TOLERANCE[precision]


# What each scheme loses against the original fp32 weights (same seeds): bf16 6.5e-3–7.1e-3,
# int8 1.3e-2–1.5e-2, int4 0.143–0.158. Limits ~1.3x that: a coarser scheme must be a decision.
SCHEME_LOSS = {"bf16": 0.01, "int8": 0.02, "int4": 0.2}


@pytest.mark.parametrize("precision", SCHEME_LOSS)
def test_each_scheme_loses_no_more_than_measured(hf_model, precision):
    loss = precision_error(native_forward(hf_model, "fp32"), native_forward(hf_model, precision))
    assert loss < SCHEME_LOSS[precision]
