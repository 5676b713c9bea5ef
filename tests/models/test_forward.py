"""spectr's forward equals transformers', token by token, in fp32; tree passes equal branch-by-branch decoding."""

import pytest
import torch

from spectr.errors import ContextOverflowError, InvalidInputError, UnsupportedModelError
from spectr.models import Forward, LlamaForward, TransformersForward, base, native_forward, native_model_types
from tests.models.tiny import VOCAB, tiny_model

NATIVE_KINDS = ["llama-gqa", "llama-mha-untied", "llama-mqa-scaled-rope", "llama3-rope", "qwen2", "mistral"]


def _tokens(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", NATIVE_KINDS)
def test_logits_equal_transformers(kind):
    hf = tiny_model(kind)
    lm = native_forward(hf, "fp32")
    tokens = _tokens(40)
    with torch.no_grad():
        expected = hf(tokens).logits
    cache = lm.new_cache(64)
    whole = lm.forward(tokens, torch.arange(40), cache)
    torch.testing.assert_close(whole.logits, expected, atol=1e-4, rtol=0)
    # The same text fed as a prefill and then in pieces, through the cache.
    cache = lm.new_cache(64)
    pieces = [lm.forward(tokens[:, :25], torch.arange(25), cache).logits]
    for start in range(25, 40, 5):
        pieces.append(lm.forward(tokens[:, start : start + 5], torch.arange(start, start + 5), cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), expected, atol=1e-4, rtol=0)
    assert cache.length == 40


def test_batched_sequences_equal_one_at_a_time():
    hf = tiny_model()
    lm = native_forward(hf, "fp32")
    tokens = torch.cat([_tokens(12, seed=1), _tokens(12, seed=2)])
    cache = lm.new_cache(32, batch=2)
    together = lm.forward(tokens, torch.arange(12), cache).logits
    for row in range(2):
        alone = lm.forward(tokens[row : row + 1], torch.arange(12), lm.new_cache(32)).logits
        torch.testing.assert_close(together[row : row + 1], alone, atol=1e-5, rtol=0)


def _tree():
    """Three branches after a 10-token prefix: [a b c], [a b' c'], [d e]. Returns tokens, parents."""
    tokens = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    parents = [-1, 0, 1, 1, 3, -1, 5]  # node -> parent node (-1: the prefix)
    return tokens, parents


def _tree_mask(parents: list[int], prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    nodes = len(parents)
    mask = torch.zeros(nodes, prefix + nodes, dtype=torch.bool)
    mask[:, :prefix] = True
    depth = []
    for node, parent in enumerate(parents):
        ancestor = node
        while ancestor != -1:
            mask[node, prefix + ancestor] = True
            ancestor = parents[ancestor]
        depth.append(0 if parent == -1 else depth[parent] + 1)
    return mask, torch.tensor(depth) + prefix


def _forward_prefix_and_tree(backend: str):
    """A model, its cache after a 10-token prefix and the tree of `_tree`, and the tree's logits."""
    hf = tiny_model("llama-gqa")
    lm = native_forward(hf, "fp32") if backend == "native" else TransformersForward(hf)
    prefix = _tokens(10)
    tree_tokens, parents = _tree()
    mask, positions = _tree_mask(parents, 10)
    cache = lm.new_cache(64)
    lm.forward(prefix, torch.arange(10), cache)
    tree_logits = lm.forward(tree_tokens[None], positions, cache, mask).logits[0]
    return lm, cache, prefix, tree_tokens, parents, tree_logits


@pytest.mark.parametrize("backend", ["native", "transformers"])
def test_tree_forward_equals_each_branch(backend):
    lm, _, prefix, tree_tokens, parents, tree_logits = _forward_prefix_and_tree(backend)
    for leaf in (2, 4, 6):
        path = []
        node = leaf
        while node != -1:
            path.insert(0, node)
            node = parents[node]
        branch = torch.cat([prefix[0], tree_tokens[path]])[None]
        alone = lm.forward(branch, torch.arange(branch.shape[1]), lm.new_cache(64)).logits[0, 10:]
        torch.testing.assert_close(tree_logits[path], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["native", "transformers"])
def test_commit_leaves_the_cache_of_the_kept_text(backend):
    lm, cache, prefix, tree_tokens, _, _ = _forward_prefix_and_tree(backend)
    accepted = [0, 1, 3, 4]  # the path a b' c'
    cache.commit(10, [10 + node for node in accepted])
    assert cache.length == 14
    after = lm.forward(torch.tensor([[3]]), torch.tensor([14]), cache).logits
    text = torch.cat([prefix[0], tree_tokens[accepted], torch.tensor([3])])[None]
    fresh = lm.forward(text, torch.arange(15), lm.new_cache(64)).logits[:, -1:]
    torch.testing.assert_close(after, fresh, atol=1e-5, rtol=0)
    cache.truncate(12)  # and rolling back is just forgetting slots
    again = lm.forward(text[:, 12:], torch.arange(12, 15), cache).logits[:, -1:]
    torch.testing.assert_close(again, fresh, atol=1e-5, rtol=0)


def test_logit_indices_select_rows():
    lm = native_forward(tiny_model(), "fp32")
    tokens = _tokens(8)
    every = lm.forward(tokens, torch.arange(8), lm.new_cache(16))
    last = lm.forward(tokens, torch.arange(8), lm.new_cache(16), logit_indices=torch.tensor([7]))
    torch.testing.assert_close(last.logits, every.logits[:, 7:], atol=1e-6, rtol=0)
    torch.testing.assert_close(last.hidden, every.hidden, atol=1e-6, rtol=0)  # hidden: every new token


def test_bad_input_is_named():
    lm = native_forward(tiny_model(), "fp32")
    cache = lm.new_cache(8)
    with pytest.raises(ContextOverflowError, match="holds 8 tokens"):
        lm.forward(_tokens(9), torch.arange(9), cache)
    with pytest.raises(ContextOverflowError, match="context is 256"):
        lm.new_cache(1000)
    with pytest.raises(ContextOverflowError, match="beyond the model's context"):
        lm.forward(_tokens(1), torch.tensor([300]), lm.new_cache(8))
    with pytest.raises(InvalidInputError, match="token ids"):
        lm.forward(torch.tensor([[VOCAB]]), torch.tensor([0]), cache)
    with pytest.raises(InvalidInputError, match="attention_mask must be bool"):
        lm.forward(_tokens(2), torch.arange(2), cache, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="attend to itself"):
        lm.forward(_tokens(2), torch.arange(2), cache, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="positions"):
        lm.forward(_tokens(2), torch.arange(3), cache)
    with pytest.raises(InvalidInputError, match="precision"):
        native_forward(tiny_model(), "fp8")
    assert cache.length == 0  # nothing half-written counts


def test_other_architectures_are_refused_by_the_native_forward():
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        native_forward(tiny_model("gpt_neox"), "fp32")


def test_every_backend_implements_the_forward_protocol():
    from spectr.models.compiled import CompiledForward

    hf = tiny_model()
    native = native_forward(hf, "fp32")
    for lm in (native, TransformersForward(tiny_model()), CompiledForward(native)):
        assert isinstance(lm, Forward), type(lm).__name__
        assert lm.config.vocab_size == VOCAB and lm.config.context_length > 0


def test_spectrs_forward_is_chosen_by_architecture_through_the_registry(monkeypatch):
    assert {"llama", "mistral", "qwen2"} <= set(native_model_types())
    built = []

    def toy_builder(hf_config, state, precision):
        built.append((hf_config.model_type, precision, sorted(state)[:1]))
        return native_forward(tiny_model(), precision)

    monkeypatch.setitem(base._BUILDERS, "gpt_neox", toy_builder)
    lm = native_forward(tiny_model("gpt_neox"), "fp32")  # a newly registered architecture is taken
    assert isinstance(lm, LlamaForward) and built and built[0][:2] == ("gpt_neox", "fp32")


def test_a_long_causal_run_goes_through_in_chunks_with_the_same_result(monkeypatch):
    """Prompts longer than PREFILL_CHUNK are run in consecutive chunks; on spectr's row-invariant kernels the
    logits, hidden states and captured layers are the same bits as one run (an explicit mask: no chunking)."""
    from spectr.models import llama

    lm = native_forward(tiny_model("llama-gqa", num_hidden_layers=3), "int4")
    monkeypatch.setattr(llama, "PREFILL_CHUNK", 4)
    tokens = _tokens(10)
    rows = torch.tensor([9, 2, 5])
    whole = lm.forward(tokens, torch.arange(10), lm.new_cache(12), llama.causal_mask(0, 10), logit_indices=rows, capture=(1,))
    cache = lm.new_cache(12)
    chunked = lm.forward(tokens, torch.arange(10), cache, logit_indices=rows, capture=(1,))
    assert cache.length == 10
    for name in ("logits", "hidden", "layers"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
