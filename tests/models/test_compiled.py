"""The opt-in compiled forward computes what the eager forward computes, tree masks and commits included."""

import pytest
import torch

from spectr.errors import InvalidInputError
from spectr.models import native_forward
from spectr.models.compiled import CompiledForward
from spectr.tree import tree_attention_mask, tree_positions
from tests.models.tiny import VOCAB, tiny_model


def test_compiled_equals_eager_on_trees_and_commits():
    eager = native_forward(tiny_model("llama-gqa"), "fp32")
    compiled = CompiledForward(eager, buckets=(1, 8))
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    eager_cache, compiled_cache = eager.new_cache(64), compiled.new_cache(64)
    for lm, cache in ((eager, eager_cache), (compiled, compiled_cache)):
        lm.forward(tokens, torch.arange(12), cache)  # a prefill longer than every bucket: eager either way
    parents = torch.tensor([-1, 0, 0, 1])
    tree = torch.tensor([[5, 6, 7, 8, 9]])  # the root and four nodes: padded to the bucket of 8
    mask, positions = tree_attention_mask(parents, 12), tree_positions(parents, 12)
    expected = eager.forward(tree, positions, eager_cache, mask).logits
    got = compiled.forward(tree, positions, compiled_cache, mask).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    for cache in (eager_cache, compiled_cache):
        cache.commit(13, [13, 14, 16])  # root, then the path of nodes 0, 1, 3
    expected = eager.forward(torch.tensor([[3]]), torch.tensor([16]), eager_cache).logits
    got = compiled.forward(torch.tensor([[3]]), torch.tensor([16]), compiled_cache).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert compiled_cache.length == eager_cache.length == 17


def test_quantised_weights_are_not_compiled():
    with pytest.raises(InvalidInputError, match="int4 run eagerly"):
        CompiledForward(native_forward(tiny_model(), "int4"))


def test_compiled_decoding_equals_eager_greedy_decoding():
    """The whole loop through the compiled target: ar steps (bucket 1) and verified trees (bucket 8)."""
    from spectr.decoding import Decoder, DecodeSettings
    from spectr.drafters import ModelDrafter
    from spectr.processing import SamplingParams

    eager = native_forward(tiny_model("llama-gqa", initializer_range=0.3), "fp32")
    compiled = CompiledForward(eager, buckets=(1, 8))
    greedy, prompt = SamplingParams(temperature=0), [3, 17, 42, 8]

    def run(target, settings, drafter=None):
        steps = list(Decoder(target, drafter, settings, greedy).stream(prompt, 16, torch.Generator()))
        return [token for step in steps for token in step.emitted], steps

    plain, _ = run(eager, DecodeSettings(method="ar"))
    assert run(compiled, DecodeSettings(method="ar"))[0] == plain
    spec, steps = run(compiled, DecodeSettings(k=2, length=3), ModelDrafter(eager))
    assert spec == plain and all(step.accepted == 3 for step in steps[:-1])  # a perfect draft: full trees
