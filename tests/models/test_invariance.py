"""Batch invariance: a row's output the same bits whether computed alone or among others.

spectr's kernels (the block linear layer and few-query attention) hold it by construction, so a
position's logits at the default precision are the same bits inside a verification tree as in a
one-token step. torch's int4 kernel (the fallback where spectr's kernels cannot be built) holds it
for its matmuls too, but its attention does not.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from spectr import checks
from spectr.models import kernels
from spectr.models.gguf import GGUFModel
from spectr.models.loading import gguf_forward, resolve_source
from spectr.models.quantize import BlockLinear, Int4Linear
from tests.models.test_gguf import _Blocks, kernel_law


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="spectr's kernels are not built here")


@pytest.mark.parametrize("layer", [pytest.param(BlockLinear, marks=needs_kernels), Int4Linear])
@pytest.mark.parametrize("kind, shape", [("Q4_1", (1536, 576)), ("Q4_1", (576, 1536)), ("Q8_0", (1024, 576))])
def test_linear_rows_are_bitwise_invariant(layer, kind, shape):
    values = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    linear = layer(_Blocks(kind, quantize(values, GGMLQuantizationType[kind]), shape).stored("w"), torch.randn(shape[0]))
    x = torch.randn(32, shape[1]).to(torch.bfloat16 if layer is Int4Linear else torch.float32)
    alone = torch.cat([linear(x[i : i + 1]) for i in range(32)])
    for rows in (1, 2, 3, 4, 7, 8, 16, 17, 32):
        assert torch.equal(linear(x[:rows]), alone[:rows]), rows


# A short cache, and one long enough that one token's queries are attended a group at a time: the queries
# packed alone below see ~60% of it, under that length, so the two ways are compared with each other.
# With `prefix` each query also masks the slots before its own first one (not on a 16-slot tile's edge), as a
# batch row does that began a new sequence in its cache (the draft data's sampling).
@needs_kernels
@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("capacity, slots", [(40, 37), (1200, 1100)])
def test_attention_rows_are_bitwise_invariant(capacity, slots, prefix):
    """A query's output from the slots it may attend, the same bits whatever else is masked or present."""
    torch.manual_seed(0)
    keys, values = torch.randn(2, 1, 3, capacity, 64), torch.randn(2, 1, 3, capacity, 64)  # [B=1, G, capacity, E]
    queries = torch.randn(1, 6, 9, 64)
    mask = torch.rand(1, 6, slots) < 0.6
    if prefix:
        for t, first in enumerate([slots // 2 + 3, 1, slots // 3 + 7, slots - 9, 17, slots // 5 + 1]):
            mask[0, t, :first] = False
    mask[0, torch.arange(6), slots - 6 + torch.arange(6)] = True
    def transposed(k):  # what a cache keeps beside the keys where this machine's kernel reads it
        return kernels.tile_keys(k) if kernels.transposed_keys() else None

    together = kernels.attend(queries, keys[0], values[0], mask, slots, transposed(keys[0]))
    for t in range(6):
        seen = mask[0, t].nonzero()[:, 0]
        # The same keys packed densely into other slots of another cache, attended alone.
        packed_keys, packed_values = torch.zeros(1, 3, capacity, 64), torch.zeros(1, 3, capacity, 64)
        packed_keys[0, :, : len(seen)], packed_values[0, :, : len(seen)] = keys[0, 0][:, seen], values[0, 0][:, seen]
        alone = kernels.attend(queries[:, t : t + 1], packed_keys, packed_values,
                               torch.ones(1, 1, len(seen), dtype=torch.bool), len(seen), transposed(packed_keys))
        assert torch.equal(alone[0, 0], together[0, t]), t
        # And alone over the whole cache, the others masked out.
        masked = kernels.attend(queries[:, t : t + 1], keys[0], values[0], mask[:, t : t + 1], slots,
                                transposed(keys[0]))
        assert torch.equal(masked[0, 0], together[0, t]), t
    expected = torch.nn.functional.scaled_dot_product_attention(
        queries.transpose(1, 2), keys[0, :, :, :slots].repeat_interleave(3, 1),
        values[0, :, :, :slots].repeat_interleave(3, 1), attn_mask=mask[:, None]).transpose(1, 2)
    torch.testing.assert_close(together, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.real_model
@needs_kernels
def test_a_tree_pass_equals_one_token_passes_bitwise():
    source = resolve_source(None)
    model = GGUFModel(source.folder / source.gguf_file)
    lm = gguf_forward(model, "native")
    # Two branches under the root, every position compared with one-token passes along its path
    # (spectr check's probe; tests/test_checks.py shows it catches a forward that drifts).
    assert checks.tree_invariance(lm, model.tokenizer()(checks.PROBE_PROMPT).input_ids) == 0.0


# The other C++ paths, built beside this machine's own: AVX2 + FMA + F16C (-march=haswell) and the
# portable one (CPUs without them, e.g. ARM). Where this machine has AVX-512 VNNI its own build runs
# the VNNI path, so the three are compared with each other.
OTHER_PATHS = {"avx2": "-march=haswell", "portable": "-march=x86-64"}


@pytest.fixture(scope="module", params=sorted(OTHER_PATHS))
def other_library(request, tmp_path_factory):
    import platform

    if not kernels.available() or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs a C++ compiler and an x86-64 machine to build the other paths beside this one")
    if request.param == "avx2" and kernels.path() == "portable":
        pytest.skip("this CPU cannot run the AVX2 path")
    flags = tuple(flag for flag in kernels.FLAGS if not flag.startswith("-march")) + (OTHER_PATHS[request.param],)
    library = kernels.load(kernels.build(tmp_path_factory.mktemp("kernels"), flags))
    assert library.spectr_kernel_path().decode() == request.param
    return library


# Output counts that are not a multiple of the VNNI path's 16-output groups, so its tail is exercised.
@pytest.mark.parametrize("activation_bits", [8, 16])
@pytest.mark.parametrize("kind, shape", [("Q4_1", (90, 576)), ("Q8_0", (70, 160))])
def test_every_kernel_path_is_row_invariant_and_they_agree(other_library, monkeypatch, kind, shape, activation_bits):
    values = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    weight = _Blocks(kind, quantize(values, GGMLQuantizationType[kind]), shape).stored("w")
    x, bias = torch.randn(11, shape[1]), torch.randn(shape[0])
    native = BlockLinear(weight, bias, activation_bits)(x)
    monkeypatch.setattr(kernels, "library", lambda: other_library)
    linear = BlockLinear(weight, bias, activation_bits)
    alone = torch.cat([linear(x[i : i + 1]) for i in range(11)])
    for rows in (1, 2, 5, 9, 11):
        assert torch.equal(linear(x[:rows]), alone[:rows]), rows
    # Every path quantizes the activations the same way and its integer dots are exact: they differ only
    # in the order of their float sums.
    torch.testing.assert_close(alone, native, rtol=1e-5, atol=2e-5)
    law = kernel_law(x, weight, bias, activation_bits)
    assert (alone.double() - law).abs().max() <= 1e-6 * law.abs().max()


def test_every_kernel_path_runs_whole_layers_invariantly_and_they_agree(other_library, monkeypatch):
    """The fused decoder layer (norms, rotation, attention, SiLU, the linear layers) on each path."""
    from spectr.models import native_forward
    from tests.models.tiny import tiny_model

    prompt = [5, 17, 3, 42, 8, 11, 29, 2]
    hf = tiny_model("llama-gqa")
    native = native_forward(hf, "int4")
    expected = native.forward(torch.tensor([prompt]), torch.arange(len(prompt)), native.new_cache(8)).logits
    monkeypatch.setattr(kernels, "library", lambda: other_library)
    lm = native_forward(hf, "int4")
    assert lm.fused
    assert checks.tree_invariance(lm, prompt) == 0.0
    logits = lm.forward(torch.tensor([prompt]), torch.arange(len(prompt)), lm.new_cache(8)).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def _batch_cases(lm, seed: int):
    """Four sequences of other lengths, each with its own cache and a tree (or one token) to run."""
    from spectr.tree import tree_attention_mask, tree_positions

    torch.manual_seed(seed)
    vocab = lm.config.vocab_size
    cases = []
    for cached, parents in [(5, []), (30, [-1, 0]), (12, [-1, -1, 0, 2]), (1, [-1])]:
        prompt = torch.randint(0, vocab, (1, cached))
        caches = [lm.new_cache(64), lm.new_cache(64)]
        for cache in caches:
            lm.forward(prompt, torch.arange(cached), cache)
        parents = torch.tensor(parents, dtype=torch.long)
        tokens = torch.randint(0, vocab, (len(parents) + 1,))
        cases.append((tokens, tree_positions(parents, cached), tree_attention_mask(parents, cached), caches))
    return cases


@pytest.mark.parametrize("precision", [pytest.param("int4", marks=needs_kernels), "fp32"])
def test_a_batched_pass_equals_each_sequence_alone_bitwise(precision):
    """forward_batch (the scheduler's pass: many sequences, each over its own cache) gives every sequence the
    same bits as its own forward: logits, hidden states, captured layers and what it writes to its cache."""
    from spectr.models import native_forward
    from spectr.models.llama import BatchItem
    from tests.models.tiny import tiny_model

    lm = native_forward(tiny_model("llama-gqa"), precision)
    assert lm.batches == (precision == "int4")  # one pass on the kernel; one after another elsewhere
    cases = _batch_cases(lm, seed=0)
    items = [BatchItem(tokens, positions, caches[0], mask, None if i % 2 else torch.tensor([0]))
             for i, (tokens, positions, mask, caches) in enumerate(cases)]
    together = lm.forward_batch(items, capture=(0,))
    for item, out, (tokens, positions, mask, caches) in zip(items, together, cases):
        alone = lm.forward(tokens[None], positions, caches[1], mask, item.logit_indices, capture=(0,))
        for got, expected in [(out.logits, alone.logits), (out.hidden, alone.hidden), (out.layers, alone.layers)]:
            assert got.shape == expected.shape and torch.equal(got, expected)
        assert caches[0].length == caches[1].length
        for a, b in [(caches[0].keys, caches[1].keys), (caches[0].values, caches[1].values)]:
            assert torch.equal(a[..., : caches[1].length, :], b[..., : caches[1].length, :])
        if caches[1].keys_t is not None:
            assert torch.equal(caches[0].keys_t, caches[1].keys_t)


@needs_kernels
def test_a_batched_pass_is_one_pass_and_refuses_a_bad_item_before_writing():
    from spectr.errors import InvalidInputError
    from spectr.models import native_forward
    from spectr.models.llama import BatchItem
    from tests.models.tiny import tiny_model

    lm = native_forward(tiny_model("llama-gqa"), "int4")
    cases = _batch_cases(lm, seed=1)
    calls = []
    stack = lm._fused_stack()
    lm._stack = lambda *args, **kwargs: (calls.append(len(args[3])), stack(*args, **kwargs))[1]
    lm._stack.layers = stack.layers
    items = [BatchItem(tokens, positions, caches[0], mask) for tokens, positions, mask, caches in cases]
    lengths = [caches[0].length for *_, caches in cases]
    lm.forward_batch(items)
    assert calls == [len(items)]  # every sequence in one kernel call
    for length, (*_, caches) in zip(lengths, cases):
        caches[0].truncate(length)
    bad = [BatchItem(tokens, positions, caches[0], mask) for tokens, positions, mask, caches in cases]
    bad[2] = BatchItem(torch.tensor([10_000]), bad[2].positions[:1], bad[2].cache)
    with pytest.raises(InvalidInputError, match="token ids"):
        lm.forward_batch(bad)
    assert [caches[0].length for *_, caches in cases] == lengths  # nothing written, no length moved
