"""The decoding loop end to end: greedy equality, full acceptance of a perfect draft, commits, bad input."""

import pytest
import torch

from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters import ModelDrafter, NgramDrafter
from spectr.errors import ContextOverflowError, InvalidInputError
from spectr.models import native_forward
from spectr.processing import SamplingParams
from spectr.tree import tree_attention_mask, tree_positions
from tests.decoder_law import perturbed_copy
from tests.lookup import LookupTableLM
from tests.models.tiny import tiny_model
from tests.sequence_law import target_law
from tests.stats import P_VALUE_THRESHOLD, chi_square_pvalue

PROMPT = [3, 17, 42, 8, 25, 3, 17]


@pytest.fixture(scope="module")
def hf_target():
    return tiny_model("llama-gqa", seed=0, initializer_range=0.3)


@pytest.fixture(scope="module")
def target(hf_target):
    return native_forward(hf_target, "fp32")


@pytest.fixture(scope="module")
def draft():
    """An unrelated random draft: it is almost never right."""
    return native_forward(tiny_model("llama-gqa", seed=1, initializer_range=0.3, num_hidden_layers=1), "fp32")


@pytest.fixture(scope="module")
def close_draft(hf_target):
    """A perturbed copy of the target: right about most, not all, of its greedy tokens."""
    return perturbed_copy(hf_target, sharpen=1.0, noise=0.02)


@pytest.fixture(scope="module")
def drafts(target, draft, close_draft):
    return {"unrelated": draft, "close": close_draft, "self": target}


# Greedy acceptance of each draft: the share of drafted tokens kept (measured: unrelated ~0.05,
# close 0.6-0.9, self 1), so that equality is tested on steps that really accept.
ACCEPTANCE = {"unrelated": (0.0, 0.3), "close": (0.45, 0.97), "self": (1.0, 1.0)}


def decode(target, drafter, settings, params, max_new_tokens=24, seed=0, prompt=PROMPT):
    decoder = Decoder(target, drafter, settings, params)
    steps = list(decoder.stream(prompt, max_new_tokens, torch.Generator().manual_seed(seed)))
    return [token for step in steps for token in step.emitted], steps


def test_plain_greedy_is_not_degenerate(target):
    tokens, _ = decode(target, None, DecodeSettings(method="ar"), SamplingParams(temperature=0))
    assert len(set(tokens)) > 5  # a tiny random model that still says something varied


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 3, 5])
@pytest.mark.parametrize("draft_kind", ["unrelated", "close", "self"])
def test_greedy_equals_plain_greedy(target, drafts, k, length, draft_kind):
    greedy = SamplingParams(temperature=0)
    plain, _ = decode(target, None, DecodeSettings(method="ar"), greedy, max_new_tokens=40)
    spec, steps = decode(target, ModelDrafter(drafts[draft_kind]), DecodeSettings(method="spectr", k=k, length=length),
                         greedy, max_new_tokens=40)
    assert spec == plain
    full_steps = steps[:-1]  # the last step may be cut by max_new_tokens
    kept = sum(step.accepted for step in full_steps) / (length * len(full_steps))
    low, high = ACCEPTANCE[draft_kind]
    assert low <= kept <= high, f"{draft_kind} draft kept {kept:.2f} of its drafted tokens"


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("length", [1, 4])
def test_greedy_n_gram_drafts_equal_plain_greedy(target, k, length):
    greedy = SamplingParams(temperature=0)
    plain, _ = decode(target, None, DecodeSettings(method="ar"), greedy, max_new_tokens=40)
    spec, _ = decode(target, NgramDrafter(), DecodeSettings(method="spectr", k=k, length=length), greedy,
                     max_new_tokens=40)
    assert spec == plain


def test_a_one_token_prompt(target, close_draft):
    greedy = SamplingParams(temperature=0)
    plain, _ = decode(target, None, DecodeSettings(method="ar"), greedy, prompt=[5])
    spec, steps = decode(target, ModelDrafter(close_draft), DecodeSettings(k=2, length=3), greedy, prompt=[5])
    assert spec == plain and sum(step.accepted for step in steps) > 0


@pytest.mark.parametrize("method,k", [("sd", 1), ("spectr", 3)])
def test_a_perfect_draft_is_always_accepted(target, method, k):
    length = 3
    tokens, steps = decode(target, ModelDrafter(target), DecodeSettings(method=method, k=k, length=length),
                           SamplingParams(temperature=1.0), max_new_tokens=40)
    assert all(len(step.emitted) == length + 1 for step in steps[:-1])
    assert len(tokens) == 40


@pytest.mark.parametrize("drafter_kind", ["none", "model", "ngram"])
def test_seeded_runs_repeat_and_seeds_matter(target, close_draft, drafter_kind):
    """Every drafter draws only from the decoder's generator (the EAGLE head: tests/test_eagle.py)."""
    method = "ar" if drafter_kind == "none" else "spectr"
    drafter = {"none": lambda: None, "model": lambda: ModelDrafter(close_draft), "ngram": NgramDrafter}[drafter_kind]
    settings, params = DecodeSettings(method=method, k=3, length=3), SamplingParams(temperature=1.0, top_k=20)
    first, _ = decode(target, drafter(), settings, params, seed=7)
    second, _ = decode(target, drafter(), settings, params, seed=7)
    other, _ = decode(target, drafter(), settings, params, seed=8)
    assert first == second and first != other


def test_max_new_tokens_inside_a_step_trims_the_step(target):
    """A perfect draft emits L + 1 tokens a step; the last step is cut to the budget, stats included."""
    tokens, steps = decode(target, ModelDrafter(target), DecodeSettings(k=2, length=3), SamplingParams(temperature=1.0),
                           max_new_tokens=10)
    assert len(tokens) == 10 and [len(step.emitted) for step in steps] == [4, 4, 2]
    assert [step.accepted for step in steps] == [3, 3, 2]
    assert len(steps[-1].candidates_per_level) == 2


def test_a_stop_token_inside_the_tree_ends_the_generation_there(target):
    """EOS accepted mid-path: the output is plain greedy's up to and including it, the rest dropped."""
    greedy = SamplingParams(temperature=0)
    plain, _ = decode(target, None, DecodeSettings(method="ar"), greedy, max_new_tokens=24)
    stop = plain[5]
    first = plain.index(stop)
    decoder = Decoder(target, ModelDrafter(target), DecodeSettings(k=1, length=4), greedy)
    steps = list(decoder.stream(PROMPT, 24, torch.Generator(), stop_token_ids=frozenset([stop])))
    tokens = [token for step in steps for token in step.emitted]
    assert tokens == plain[: first + 1]
    assert steps[-1].emitted[-1] == stop and steps[-1].accepted == len(steps[-1].emitted)
    assert first % 5 != 4  # the stop token was inside a step of 5, not its last token


def test_a_prompt_that_fills_the_context(target, close_draft):
    """The longest prompt that leaves room for the new tokens and one tree decodes; one more is refused."""
    settings, greedy, new = DecodeSettings(k=2, length=3), SamplingParams(temperature=0), 8
    longest = target.config.context_length - new - settings.tree_size - 1
    prompt = (PROMPT * 40)[:longest]
    plain, _ = decode(target, None, DecodeSettings(method="ar"), greedy, max_new_tokens=new, prompt=prompt)
    spec, _ = decode(target, ModelDrafter(close_draft), settings, greedy, max_new_tokens=new, prompt=prompt)
    assert spec == plain and len(spec) == new
    with pytest.raises(ContextOverflowError, match="the model's context is 256"):
        decode(target, ModelDrafter(close_draft), settings, greedy, max_new_tokens=new, prompt=prompt + [3])


def test_commit_leaves_both_caches_as_fresh_forwards(target, close_draft):
    """After a step, each cache equals a fresh forward over the text it claims to hold."""
    params = SamplingParams(temperature=1.0)
    draft = close_draft
    decoder = Decoder(target, ModelDrafter(draft), DecodeSettings(k=3, length=3), params)
    generation = decoder.start(list(PROMPT), 40, torch.Generator().manual_seed(3))
    text, cache = generation.text, generation.cache
    accepted = []
    for _ in range(6):
        target_pass = generation.prepare()
        out = target.forward(target_pass.tokens[None], target_pass.positions, cache, target_pass.attention_mask)
        stats = generation.complete(out, 0.0)
        accepted.append(stats.accepted)
        assert cache.length == len(text) - 1
        probe = torch.tensor([[text[-1]]])
        after = target.forward(probe, torch.tensor([len(text) - 1]), cache).logits
        cache.truncate(len(text) - 1)
        fresh = target.forward(torch.tensor(text)[None], torch.arange(len(text)), target.new_cache(64)).logits[:, -1:]
        # fp32 sums in another order differ by ~1e-5 on logits of ~10; a wrong slot moves them by O(1).
        torch.testing.assert_close(after, fresh, atol=1e-4, rtol=0)
        drafted = decoder.drafter
        held = drafted.cached
        draft_after = draft.forward(torch.tensor([text[held:]]), torch.arange(held, len(text)), drafted.cache).logits[:, -1:]
        drafted.cache.truncate(held)
        draft_fresh = draft.forward(torch.tensor(text)[None], torch.arange(len(text)), draft.new_cache(64)).logits[:, -1:]
        torch.testing.assert_close(draft_after, draft_fresh, atol=1e-4, rtol=0)
    assert sum(accepted) >= 6 and max(accepted) == 3, accepted  # whole drafts kept, not only rejections


def test_decoder_samples_follow_the_target_end_to_end():
    """The real loop on lookup-table models: first 3 tokens, chi-square against the target's law."""
    target, draft = LookupTableLM.random(4, seed=1), LookupTableLM.random(4, seed=2)
    prompt, runs = [0, 2], 4000
    decoder = Decoder(target, ModelDrafter(draft), DecodeSettings(k=2, length=2), SamplingParams(temperature=1.0))
    generator = torch.Generator().manual_seed(11)
    outcomes = []
    for _ in range(runs):
        tokens = [t for step in decoder.stream(prompt, 3, generator) for t in step.emitted]
        outcomes.append(tokens[0] * 16 + tokens[1] * 4 + tokens[2])
    law = target_law(prompt, 3, target)
    expected = torch.tensor([law[(a, b, c)] for a in range(4) for b in range(4) for c in range(4)])
    assert chi_square_pvalue(torch.tensor(outcomes), expected) > P_VALUE_THRESHOLD


def test_bad_settings_are_named(target, draft):
    with pytest.raises(InvalidInputError, match="k must be an int >= 1"):
        DecodeSettings(k=0)
    with pytest.raises(InvalidInputError, match="L must be an int >= 1"):
        DecodeSettings(length=0)
    with pytest.raises(InvalidInputError, match="method must be one of"):
        DecodeSettings(method="beam")
    with pytest.raises(InvalidInputError, match="rule 'standard' takes one draft"):
        DecodeSettings(method="spectr", rule="standard", k=2)
    with pytest.raises(InvalidInputError, match="rule must be one of"):
        DecodeSettings(rule="magic")
    with pytest.raises(InvalidInputError, match="needs a drafter"):
        Decoder(target, None, DecodeSettings(), SamplingParams())
    decoder = Decoder(target, ModelDrafter(draft), DecodeSettings(k=4, length=4), SamplingParams())
    with pytest.raises(ContextOverflowError, match="the model's context is 256"):
        next(decoder.stream(list(range(90)) * 3, 10, torch.Generator()))
    with pytest.raises(InvalidInputError, match="prompt is empty"):
        next(decoder.stream([], 10, torch.Generator()))
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        next(decoder.stream(PROMPT, 0, torch.Generator()))


def test_tree_mask_and_positions_literal():
    parents = torch.tensor([-1, -1, 0, 1, 3])
    assert tree_positions(parents, cached=10).tolist() == [10, 11, 11, 12, 12, 13]
    mask = tree_attention_mask(parents, cached=2).int()
    assert mask.tolist() == [
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 1, 0, 0],
        [1, 1, 1, 0, 1, 0, 1, 0],
        [1, 1, 1, 0, 1, 0, 1, 1],
    ]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_the_head_runs_only_on_rows_the_walk_reads_and_samples_the_same(hf_target, close_draft, precision, monkeypatch):
    """Verification computes p lazily (the root's with the pass, then the accepted path's): the rows read are
    those of the accepted path, and on spectr's row-invariant kernels (int4) the tokens equal the all-rows computation's."""
    target = native_forward(hf_target, precision)
    settings, params = DecodeSettings(k=3, length=3), SamplingParams(temperature=1.0)
    rows_read = []
    real_head = target.logits

    def counting_head(hidden):
        rows_read.append(hidden.shape[0])
        return real_head(hidden)

    decoder = Decoder(target, ModelDrafter(close_draft), settings, params)
    decoder._head = counting_head
    steps, read = [], 0
    for step in decoder.stream(PROMPT, 24, torch.Generator().manual_seed(3)):
        if len(step.emitted) == step.accepted + 1:  # (the last step may be cut at max_new_tokens)
            # One row per emitted token: the root's (with the target's pass), then each accepted node's
            # (asked of the head by the walk), never the whole tree.
            assert len(rows_read) - read == step.accepted
        read = len(rows_read)
        steps.append(step)
    assert all(n == 1 for n in rows_read)
    assert any(step.accepted for step in steps)
    assert sum(step.tree_nodes + 1 for step in steps) > 2 * (len(rows_read) + len(steps))
    lazy = [token for step in steps for token in step.emitted]
    eager_decoder = Decoder(target, ModelDrafter(close_draft), settings, params)
    eager_decoder._head = None  # all rows inside forward, as for transformers' forward
    eager = [token for step in eager_decoder.stream(PROMPT, 24, torch.Generator().manual_seed(3)) for token in step.emitted]
    if precision == "int4" and target.fused:
        assert lazy == eager
    else:
        assert len(eager) == len(lazy) == 24


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_judged_path_has_its_rows_with_the_pass_and_its_last_row_only_when_kept(hf_target, close_draft, precision):
    """Block verification reads p before every path token whatever it draws: those rows come with the
    target's pass (the LM head reads its weight once for all), and the head runs after the pass only for
    the last row of a path kept whole (its bonus token). The tokens equal the all-rows computation's on the
    row-invariant kernels."""
    target = native_forward(hf_target, precision)
    settings, params = DecodeSettings(method="sd", rule="block", length=3), SamplingParams(temperature=1.0)
    asked, after = [], []
    forward, real_head = target.forward, target.logits

    class Recording:
        config, logits = target.config, staticmethod(lambda hidden: (after.append(hidden.shape[0]), real_head(hidden))[1])

        def __getattr__(self, name):
            return getattr(target, name)

        def forward(self, tokens, positions, cache, attention_mask=None, logit_indices=None, **kwargs):
            asked.append((tokens.shape[1], None if logit_indices is None else logit_indices.tolist()))
            return forward(tokens, positions, cache, attention_mask, logit_indices, **kwargs)

    decoder = Decoder(Recording(), ModelDrafter(close_draft), settings, params)
    steps = list(decoder.stream(PROMPT, 30, torch.Generator().manual_seed(5)))
    passes = [rows for tokens, rows in asked if tokens == 4]  # the steps' passes: the root and 3 path tokens
    assert len(passes) == len(steps) and all(rows == [0, 1, 2] for rows in passes)
    whole = sum(step.accepted == 3 and len(step.emitted) == 4 for step in steps)
    # (the last step may be cut at max_new_tokens after its bonus row was read)
    assert set(after) <= {1} and whole <= len(after) <= whole + 1
    assert whole > 0 and any(step.accepted < 3 for step in steps)
    eager_decoder = Decoder(target, ModelDrafter(close_draft), settings, params)
    eager_decoder._head = None  # all rows inside forward
    eager = [t for step in eager_decoder.stream(PROMPT, 30, torch.Generator().manual_seed(5)) for t in step.emitted]
    if precision == "int4" and target.fused:
        assert [t for step in steps for t in step.emitted] == eager
