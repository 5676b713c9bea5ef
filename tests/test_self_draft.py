"""Self-speculation: the target with layers skipped drafts in the target's own cache, and the output stays
the target's (law and greedy text); the skipping forward is the model without those layers."""

import pytest
import torch

from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters.self_draft import SelfDrafter, parse_skip
from spectr.errors import InvalidInputError
from spectr.models import native_forward
from spectr.processing import SamplingParams
from tests.decoder_law import check_decoder_law
from tests.models.tiny import tiny_model
from tests.stats import P_VALUE_THRESHOLD


@pytest.mark.parametrize("precision", ["fp32", "int4"])  # torch's layers; spectr's fused kernel
def test_skipping_layers_is_the_model_without_them(precision):
    hf = tiny_model("llama-gqa", num_hidden_layers=4)
    lm, reference = native_forward(hf, precision), native_forward(hf, precision)
    del reference.layers[1:3]  # the model without layers 1 and 2 (its cache keeps their slots, unused)
    tokens = torch.tensor([[5, 17, 3, 42, 8, 11]])
    skipped = lm.forward(tokens, torch.arange(6), lm.new_cache(8), skip=frozenset({1, 2})).logits
    assert torch.equal(skipped, reference.forward(tokens, torch.arange(6), reference.new_cache(8)).logits)
    full = lm.forward(tokens, torch.arange(6), lm.new_cache(8)).logits
    assert not torch.equal(skipped, full)
    with pytest.raises(InvalidInputError, match="skip names layers"):
        lm.forward(tokens, torch.arange(6), lm.new_cache(8), skip=frozenset({4}))


def test_skip_specs_are_parsed_and_bad_ones_named():
    assert parse_skip("self-skip", 30) == tuple(range(10, 20))  # the middle third
    assert parse_skip("self-skip:3-5,9", 30) == (3, 4, 5, 9)
    for bad, message in [("self-skip:30", "layers 0..29"), ("self-skip:0-29", "every layer"),
                         ("self-skip:a", "numbers or ranges"), ("self-skipper", "self-skip:<layers>")]:
        with pytest.raises(InvalidInputError, match=message):
            parse_skip(bad, 30)


SHAPES = {"standard": DecodeSettings(method="sd", k=1, length=3),
          "kseq": DecodeSettings(method="spectr", rule="kseq", k=2, length=2),
          "dynamic": DecodeSettings(method="spectr", k=2, length=3, tree="dynamic", budget=5)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_self_drafts_keep_the_target_law(shape):
    # Three layers at the law target's scale; the draft skips the middle one.
    target = native_forward(tiny_model("llama-gqa", seed=0, initializer_range=0.6, num_hidden_layers=3), "fp32")
    drafter = SelfDrafter(target, skip=[1])
    exact = check_decoder_law(target, drafter, SHAPES[shape], SamplingParams(temperature=0.7), streams=15)
    assert exact.accepted > exact.steps / 5  # the draft takes part (random layers: ~0.27 accepted a step)
    assert exact.pvalue > P_VALUE_THRESHOLD, exact


def test_greedy_self_speculation_equals_greedy_decoding_on_the_kernel():
    target = native_forward(tiny_model("llama-gqa", num_hidden_layers=4), "int4")
    prompt, greedy = [5, 17, 3, 42], SamplingParams(temperature=0.0)
    plain = Decoder(target, None, DecodeSettings(method="ar"), greedy)
    expected = [t for s in plain.stream(prompt, 40, torch.Generator().manual_seed(0)) for t in s.emitted]
    for settings in SHAPES.values():
        decoder = Decoder(target, SelfDrafter(target, skip=[1, 2]), settings, greedy)
        steps = list(decoder.stream(prompt, 40, torch.Generator().manual_seed(0)))
        assert [t for s in steps for t in s.emitted] == expected
        assert sum(s.accepted for s in steps) > 0


def test_a_self_draft_needs_the_targets_cache():
    target = native_forward(tiny_model("llama-gqa"), "fp32")
    drafter = SelfDrafter(target, skip=[0])
    drafter.reset(16)
    with pytest.raises(InvalidInputError, match="attaches it first"):
        drafter.propose([1, 2, 3], 1, 2, SamplingParams(temperature=1.0), torch.Generator())
