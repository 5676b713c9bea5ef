"""SparQ attention and the SparQ self-draft: the approximation is plain attention where it keeps every slot,
its error falls as it keeps more, the kernel computes the reference's function on every path, the cache's
running value means follow writes, rollbacks and commits, and decoding with it as a draft keeps the
target's law and greedy text."""

import pytest
import torch

from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters.self_draft import SelfDraft, SelfDrafter, parse_self_draft
from spectr.errors import InvalidInputError
from spectr.models import KVCache, kernels, native_forward
from spectr.models.attention import SparQ, attend, sparq_attend
from spectr.processing import SamplingParams
from tests.decoder_law import check_decoder_law
from tests.models.test_invariance import other_library  # noqa: F401 (a fixture: the other kernel paths)
from tests.models.tiny import tiny_model
from tests.test_self_draft import SHAPES  # the decoding shapes every self-draft is tested under
from tests.stats import P_VALUE_THRESHOLD

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="spectr's kernels are not built here")


def _case(seed: int, slots: int = 300, tokens: int = 2, heads: int = 6, kv_heads: int = 2, head_dim: int = 32,
          peaked: float = 0.0):
    """Queries [1, H, T, E], keys and values [1, G, S, E], a mask that hides a few older slots from one
    query and the last slot from the first token. peaked > 0: a few keys aligned with the queries, as
    trained attention has (SparQ's premise)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, tokens, head_dim, generator=generator)
    k = torch.randn(1, kv_heads, slots, head_dim, generator=generator)
    v = torch.randn(1, kv_heads, slots, head_dim, generator=generator)
    if peaked:
        hot = torch.randint(0, slots, (12,), generator=generator)
        k[:, :, hot] += peaked * q.mean((1, 2))[:, None]
    mask = torch.ones(1, 1, tokens, slots, dtype=torch.bool)
    mask[..., 0, -1] = False
    mask[..., -1, 40:43] = False
    return q, k, v, mask


def _mean(v: torch.Tensor, dense_from: int) -> torch.Tensor:
    return v[:, :, :dense_from].mean(2) if dense_from else torch.zeros(v.shape[:2] + v.shape[3:])


def test_sparq_keeping_every_slot_is_plain_attention():
    q, k, v, mask = _case(0)
    full = attend(q, k, v, mask)
    for rank in (1, 8, 32):  # whatever the components, nothing is left out
        out = sparq_attend(q, k, v, mask, _mean(v, 256), SparQ(rank=rank, keep=300), dense_from=256)
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)
    # Nothing older than the window: plain attention too.
    torch.testing.assert_close(sparq_attend(q, k, v, mask, _mean(v, 0), SparQ(rank=2, keep=4), 0), full,
                               rtol=1e-5, atol=1e-6)
    # Keeping fewer is not plain attention.
    assert (sparq_attend(q, k, v, mask, _mean(v, 256), SparQ(rank=8, keep=16), 256) - full).abs().max() > 1e-2


def test_sparq_error_falls_as_it_keeps_more():
    errors = {}
    for rank, keep in [(2, 8), (8, 8), (8, 64), (32, 64), (32, 160)]:
        total = 0.0
        for seed in range(8):
            q, k, v, mask = _case(seed, peaked=1.5)
            full = attend(q, k, v, mask)
            out = sparq_attend(q, k, v, mask, _mean(v, 256), SparQ(rank=rank, keep=keep), 256)
            total += float((out - full).norm() / full.norm())
        errors[rank, keep] = total / 8
    ordered = list(errors.values())
    assert all(a > b for a, b in zip(ordered, ordered[1:])), errors
    assert ordered[0] > 4 * ordered[-1], errors


def _kernel_case(q, k, v, mask, capacity):
    """The same case in the kernel's layout: queries [B, T, H, E], a cache of `capacity` slots."""
    keys = torch.zeros(1, k.shape[1], capacity, k.shape[3])
    values = torch.zeros_like(keys)
    keys[:, :, : k.shape[2]], values[:, :, : v.shape[2]] = k, v
    return q.transpose(1, 2).contiguous(), keys, values, mask[:, 0].contiguous(), kernels.tile_keys(keys)


@needs_kernels
@pytest.mark.parametrize("rank, keep, dense_from, slots", [(32, 400, 256, 300), (8, 40, 256, 300), (4, 16, 160, 203),
                                                           (1, 1, 96, 130), (8, 40, 0, 100)])
def test_the_kernel_computes_the_reference(rank, keep, dense_from, slots):
    q, k, v, mask = _case(3, slots=slots, tokens=3, head_dim=32)
    expected = sparq_attend(q, k, v, mask, _mean(v, dense_from), SparQ(rank=rank, keep=keep), dense_from)
    queries, keys, values, flat_mask, keys_t = _kernel_case(q, k, v, mask, capacity=slots + 21)
    sparse = kernels.Sparse(rank, keep, dense_from, _mean(v, dense_from).contiguous())
    for tiles in (keys_t, None):  # keys read transposed by tiles (the VNNI build) or by slot
        out = kernels.attend(queries, keys, values, flat_mask, slots, tiles, sparse)
        torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-5, atol=2e-6)


def test_the_kernel_computes_the_reference_on_every_path(other_library, monkeypatch):
    q, k, v, mask = _case(4, slots=250, tokens=2, head_dim=32)
    expected = sparq_attend(q, k, v, mask, _mean(v, 192), SparQ(rank=8, keep=24), 192)
    queries, keys, values, flat_mask, keys_t = _kernel_case(q, k, v, mask, capacity=256)
    monkeypatch.setattr(kernels, "library", lambda: other_library)
    out = kernels.attend(queries, keys, values, flat_mask, 250, None, kernels.Sparse(8, 24, 192, _mean(v, 192)))
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-5, atol=2e-6)


def test_the_cache_keeps_the_mean_of_its_older_values():
    cache = KVCache(num_layers=2, batch=1, num_kv_heads=2, capacity=64, head_dim=4, dtype=torch.float32)
    values = torch.randn(2, 1, 2, 64, 4)

    def fill(start, count):
        for layer in range(2):
            cache.write(layer, start, values[layer, :, :, start : start + count], values[layer, :, :, start : start + count])
        cache.length = start + count

    def expected(upto):
        return cache.values[:, :, :, :upto].double().mean(3).float()

    fill(0, 40)
    torch.testing.assert_close(cache.value_means(32), expected(32))
    torch.testing.assert_close(cache.value_means(16), expected(16))  # back
    torch.testing.assert_close(cache.value_means(32), expected(32))
    cache.truncate(20)  # slots 20.. forgotten, then written anew
    values[:, :, :, 20:] += 5
    fill(20, 20)
    torch.testing.assert_close(cache.value_means(36), expected(36))
    cache.commit(30, [33, 35])  # slots 30, 31 change
    torch.testing.assert_close(cache.value_means(32), expected(32))
    assert torch.equal(cache.value_means(0), torch.zeros(2, 1, 2, 4))
    with pytest.raises(InvalidInputError, match="a mean over 40"):
        cache.value_means(40)


def test_self_draft_specs_are_parsed_and_bad_ones_named():
    assert parse_self_draft("sparq", 30) == SelfDraft(sparse=SparQ())
    assert parse_self_draft("sparq:8,64", 30) == SelfDraft(sparse=SparQ(rank=8, keep=64))
    assert parse_self_draft("sparq:8,64+self-skip:3-5", 30) == SelfDraft(skip=(3, 4, 5), sparse=SparQ(8, 64))
    assert parse_self_draft("self-skip:1", 4) == SelfDraft(skip=(1,))
    for bad, message in [("sparq:8", "sparq:<rank>,<keep>"), ("sparq:0,4", "rank >= 1"),
                         ("sparq+sparq:4,4", "SparQ twice"), ("self-skip:1+self-skip:2", "layers twice")]:
        with pytest.raises(InvalidInputError, match=message):
            parse_self_draft(bad, 30)


# Small enough to engage on a tiny model's short texts: past 16 + 8 slots the older ones are sparse.
TINY_SPARQ = SparQ(rank=4, keep=8, window=16)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_sparq_self_drafts_keep_the_target_law(shape):
    target = native_forward(tiny_model("llama-gqa", seed=0, initializer_range=0.6, num_hidden_layers=3), "fp32")
    drafter = SelfDrafter(target, sparse=TINY_SPARQ)
    exact = check_decoder_law(target, drafter, SHAPES[shape], SamplingParams(temperature=0.7), streams=15)
    assert exact.accepted > exact.steps / 2  # a close draft
    assert exact.pvalue > P_VALUE_THRESHOLD, exact


@pytest.mark.parametrize("precision", ["fp32", "int4"])  # torch's layers and attention; spectr's fused kernel
def test_greedy_sparq_speculation_equals_greedy_decoding(precision):
    target = native_forward(tiny_model("llama-gqa", num_hidden_layers=4), precision)
    prompt, greedy = list(range(5, 45)), SamplingParams(temperature=0.0)  # SparQ from the first step
    plain = Decoder(target, None, DecodeSettings(method="ar"), greedy)
    expected = [t for s in plain.stream(prompt, 60, torch.Generator().manual_seed(0)) for t in s.emitted]
    for drafter in (SelfDrafter(target, sparse=TINY_SPARQ), SelfDrafter(target, skip=[1], sparse=TINY_SPARQ)):
        for settings in SHAPES.values():
            steps = list(Decoder(target, drafter, settings, greedy).stream(prompt, 60, torch.Generator().manual_seed(0)))
            assert [t for s in steps for t in s.emitted] == expected
            assert sum(s.accepted for s in steps) > 0


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_the_sparq_forward_is_an_approximation_that_engages_past_its_window(precision):
    target = native_forward(tiny_model("llama-gqa"), precision)
    tokens = torch.randint(0, target.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(0))

    def next_logits(length, sparse):
        cache = target.new_cache(96)
        target.forward(tokens[:, :length], torch.arange(length), cache)
        return target.forward(tokens[:, length : length + 1], torch.tensor([length]), cache, sparse=sparse).logits

    assert torch.equal(next_logits(20, TINY_SPARQ), next_logits(20, None))  # 0 older slots: plain
    sparse, full = next_logits(79, TINY_SPARQ), next_logits(79, None)
    assert not torch.equal(sparse, full)
    assert (sparse.softmax(-1) - full.softmax(-1)).abs().sum() / 2 < 0.5  # close, not equal


def test_the_approximate_mode_is_opt_in_and_labelled(tmp_path):
    import spectr
    from tests.models.test_loading import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny")
    exact = spectr.load(folder, draft="ngram", precision="fp32")
    assert exact.approximate is None and "APPROXIMATE" not in exact.describe()
    engine = spectr.load(folder, draft="ngram", precision="fp32", approximate="sparq:2,4")
    assert engine.approximate == SparQ(rank=2, keep=4) and "APPROXIMATE" in engine.describe()
    assert getattr(engine.target_forward(), "approximate", False)
    prompt = [3 + i % 90 for i in range(120)]  # long enough for SparQ to engage
    rough = spectr.generate(engine, prompt, method="ar", max_new_tokens=6, temperature=0.0)
    assert len(rough.tokens) == 6
    with pytest.raises(InvalidInputError, match="sparq:<rank>,<keep>"):
        spectr.load(folder, draft="ngram", precision="fp32", approximate="sparq:2")
    fallback = save_tiny_model(tmp_path / "neox", kind="gpt_neox")  # runs through transformers' forward
    with pytest.raises(InvalidInputError, match="needs spectr's own forward"):
        spectr.load(fallback, draft="ngram", precision="fp32", approximate="sparq")
