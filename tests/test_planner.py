"""The `auto` shape (planner.py): the choice it makes from a cost profile and observed acceptance, the
profile's measurement and cache, and decoding with it — exact, greedy-equal, reproducible."""

from collections import Counter

import pytest
import torch

from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters import EagleDrafter, ModelDrafter
from spectr.errors import InvalidInputError
from spectr.models import native_forward
from spectr.planner import (BATCH_ROWS, BATCH_SEQUENCES, EXPLORE_AT_MOST, EXPLORE_EVERY, BatchLoad, CostProfile, PathPlanner, cached_profile,
                            measure_profile)
from spectr.processing import SamplingParams
from tests.decoder_law import check_decoder_law, law_target, perturbed_copy
from tests.models.tiny import tiny_model
from tests.stats import P_VALUE_THRESHOLD

# A tree token nearly free, drafting cheap: long paths pay when the draft agrees.
CHEAP_TREES = CostProfile(target_seconds=tuple(0.010 + 0.0005 * n for n in range(7)),
                          draft_seconds=tuple(0.001 * (n + 1) for n in range(6)))
# Every tree token as dear as a step: only plain steps pay (this machine with today's draft, nearly).
DEAR_TREES = CostProfile(target_seconds=tuple(0.010 * (n + 1) for n in range(7)),
                         draft_seconds=tuple(0.004 * (n + 1) for n in range(6)))


def test_expected_tokens_is_the_chain_of_acceptances():
    planner = PathPlanner(CHEAP_TREES, 3)
    planner.acceptance = [0.5, 0.4, 0.2]
    assert planner.expected_tokens(0) == 1
    assert planner.expected_tokens(3) == pytest.approx(1 + 0.5 + 0.2 + 0.04)


def test_the_choice_follows_acceptance_and_cost():
    cheap, dear = PathPlanner(CHEAP_TREES, 6), PathPlanner(DEAR_TREES, 6)
    for planner in (cheap, dear):
        planner.acceptance = [0.9] * 6
    assert cheap.best_length() == 6
    assert dear.best_length() == 0  # 0.9 a token does not repay a forward that costs L + 1 steps
    cheap.acceptance = [0.05] * 6
    assert cheap.best_length() == 0
    cheap.acceptance = [0.6] * 6
    assert 0 < cheap.best_length() < 6


# The same, and on a long context a draft that reads little of the cache: the target's steps cost 2.5x as
# much there, the draft's 1.2x (SparQ's case).
CHEAPER_DRAFT_LATER = CostProfile(target_seconds=tuple(0.010 * (n + 1) for n in range(7)),
                                  draft_seconds=tuple(0.004 * (n + 1) for n in range(6)), context=128,
                                  long_target_seconds=tuple(0.025 + 0.006 * n for n in range(7)),
                                  long_draft_seconds=tuple(0.0048 * (n + 1) for n in range(6)), long_context=2048)


def test_costs_follow_the_context_on_the_line_through_the_two_measured():
    profile = CHEAPER_DRAFT_LATER
    assert profile.step_seconds(2) == profile.step_seconds(2, 128) == pytest.approx(0.030 + 0.008)
    assert profile.step_seconds(2, 2048) == pytest.approx(0.037 + 0.0096)
    assert profile.step_seconds(2, 1088) == pytest.approx((0.038 + 0.0466) / 2)  # halfway
    assert profile.step_seconds(0, 3968) == pytest.approx(0.010 + 2 * 0.015)  # beyond: extrapolated
    assert profile.step_seconds(0, 16) == profile.step_seconds(0)  # below the short one: the short one
    assert DEAR_TREES.step_seconds(3, 4096) == DEAR_TREES.step_seconds(3)  # measured on one context only


def test_the_choice_follows_the_context():
    planner = PathPlanner(CHEAPER_DRAFT_LATER, 6)
    planner.acceptance = [0.9] * 6
    assert planner.best_length(200) == 0  # a short text: the tree costs what separate steps would
    assert planner.best_length(4000) > 1  # a long one: the draft gains on the target
    assert planner.choose(4000) > 1


# Cheap trees alone; in a batch, a pass over R rows of many sequences: a fixed part and a cost per row.
def batched(profile: CostProfile, fixed: float, per_row: float) -> CostProfile:
    from dataclasses import replace

    return replace(profile, batch_rows=BATCH_ROWS, batch_seconds=tuple(fixed + per_row * r for r in BATCH_ROWS))


def test_a_pass_costs_what_was_measured_between_and_beyond():
    profile = batched(CHEAP_TREES, 0.002, 0.001)
    assert profile.pass_seconds(1) == pytest.approx(0.003) and profile.pass_seconds(0) == pytest.approx(0.003)
    assert profile.pass_seconds(12) == pytest.approx(0.014)  # between 8 and 16
    assert profile.pass_seconds(100) == pytest.approx(0.102)  # beyond 64: the last two's line
    assert profile.pass_seconds(12, 4) == profile.pass_seconds(12)  # sequences not measured: rows alone
    # Each sequence also reads its own cache: 0.5 ms more a sequence than a row of one sequence.
    from dataclasses import replace

    both = replace(profile, batch_sequences=BATCH_SEQUENCES, sequence_seconds=tuple(0.002 + 0.0015 * s for s in BATCH_SEQUENCES))
    assert both.pass_seconds(12, 1) == pytest.approx(0.014)
    assert both.pass_seconds(12, 4) == pytest.approx(0.014 + 4 * 0.0005)
    assert both.pass_seconds(40, 32) == pytest.approx(0.042 + 32 * 0.0005)  # beyond 16 sequences: the line
    with pytest.raises(InvalidInputError, match="no batched passes"):
        CHEAP_TREES.pass_seconds(4)


def test_under_load_the_batch_rate_decides():
    """The same draft, the same acceptance: alone it drafts long paths; beside a batch, the more the batch
    already brings the shorter its paths, down to plain steps once rows cost what they cost (the machine
    busy); where rows are nearly free (a pass costs its weights' reading) it keeps drafting longer."""
    def lengths(profile):
        planner = PathPlanner(profile, 6)
        planner.acceptance = [0.8] * 6
        loads = [BatchLoad(rows, float(rows), 0.0002 * rows) for rows in (1, 3, 7, 15)]
        return planner.best_length(), [planner.best_length(load=load) for load in loads]

    alone, loaded = lengths(batched(CHEAP_TREES, 0.006, 0.0008))
    assert alone == 5 and loaded == sorted(loaded, reverse=True) and 0 < loaded[0] < alone and loaded[-1] == 0
    assert lengths(batched(CHEAP_TREES, 0.002, 0.0015))[1] == [0, 0, 0, 0]  # rows as dear as steps
    assert lengths(batched(CHEAP_TREES, 0.010, 0.00005))[1][:2] == [5, 3]  # rows nearly free: longer paths
    busy = BatchLoad(rows=7, tokens=7.0, seconds=0.001)
    planner = PathPlanner(batched(CHEAP_TREES, 0.006, 0.0008), 6)
    assert planner.choose(load=busy) == 0 and planner.chosen[0] == 1
    # A profile without batched passes (measured by an older spectr) chooses as alone.
    assert PathPlanner(CHEAP_TREES, 6).best_length(load=busy) == PathPlanner(CHEAP_TREES, 6).best_length()


def test_a_step_costs_its_own_work_beside_the_pass():
    """The measured work of a step outside the pass and the proposal (selection, the tree's mask, commits)
    counts in its cost: a path whose bookkeeping costs what it gains is not drafted."""
    from dataclasses import replace

    planner = PathPlanner(CHEAP_TREES, 6)
    planner.acceptance = [0.5] * 6
    assert planner.best_length() > 0
    assert CHEAP_TREES.step_seconds(2) == pytest.approx(0.011 + 0.002)
    costly = replace(CHEAP_TREES, overhead_seconds=(0.0003,) + (0.010,) * 6)
    assert costly.step_seconds(2) == pytest.approx(0.011 + 0.002 + 0.010)
    assert costly.step_seconds(0) == pytest.approx(0.0103)
    slow_bookkeeping = PathPlanner(costly, 6)
    slow_bookkeeping.acceptance = [0.5] * 6
    assert slow_bookkeeping.best_length() == 0
    # on a long context the overhead stays what it is (it does not read the cache)
    long = replace(CHEAPER_DRAFT_LATER, overhead_seconds=(0.001,) * 7)
    assert long.step_seconds(2, 2048) == pytest.approx(CHEAPER_DRAFT_LATER.step_seconds(2, 2048) + 0.001)


def test_a_path_kept_whole_pays_for_its_last_row():
    """The bonus token of a path kept to its end needs its last row's logits after the pass (the LM head alone:
    head_seconds), paid with the chance Π a_i: a dearer head moves the choice to longer paths (whose end is
    reached less often), then to plain steps."""
    from dataclasses import replace

    def best(head_seconds):
        planner = PathPlanner(replace(CHEAP_TREES, head_seconds=head_seconds), 6)
        planner.acceptance = [0.35] + [0.2] * 5
        return planner.best_length()

    assert PathPlanner(CHEAP_TREES, 3).kept_whole(0) == 0
    planner = PathPlanner(CHEAP_TREES, 3)
    planner.acceptance = [0.5, 0.4, 0.3]
    assert planner.kept_whole(2) == pytest.approx(0.2)
    assert (best(0.0), best(0.0001), best(0.005), best(0.05)) == (1, 1, 2, 0)


def test_plain_steps_still_look_at_the_draft_now_and_then():
    """One step in 8 drafts, then one in 16, 32, 64, 64: less often while drafting keeps losing."""
    planner = PathPlanner(DEAR_TREES, 4)
    chosen = [planner.choose() for _ in range(400)]
    looks = [i for i, length in enumerate(chosen) if length]
    assert set(chosen) == {0, 1}
    gaps = [b - a for a, b in zip([-1] + looks, looks)]
    assert gaps[:6] == [EXPLORE_EVERY, 2 * EXPLORE_EVERY, 4 * EXPLORE_EVERY, EXPLORE_AT_MOST, EXPLORE_AT_MOST,
                        EXPLORE_AT_MOST]
    planner.acceptance = [0.99] * 4  # drafting pays again: the interval starts over
    assert planner.choose() == 0 or planner.explore_after == EXPLORE_EVERY


def test_observations_move_the_estimate():
    planner = PathPlanner(CHEAP_TREES, 3)
    before = list(planner.acceptance)
    for _ in range(50):
        planner.observe([0.95, 0.9])
    assert planner.acceptance[0] > 0.9 and planner.acceptance[1] > 0.85 and planner.acceptance[2] == before[2]
    for _ in range(100):  # and forget: the text got harder (a horizon of 32 observations)
        planner.observe([0.1])
    assert planner.acceptance[0] < 0.2


def test_a_profile_too_short_is_refused():
    with pytest.raises(InvalidInputError, match="covers paths of up to 6"):
        PathPlanner(CHEAP_TREES, 8)
    with pytest.raises(InvalidInputError, match="needs the machine's cost profile"):
        Decoder(None, object(), DecodeSettings(tree="auto"), SamplingParams())


@pytest.fixture(scope="module")
def models():
    hf = tiny_model("llama-gqa", seed=0, initializer_range=0.3)
    return native_forward(hf, "fp32"), perturbed_copy(hf, sharpen=1.0, noise=0.02)


def test_measured_profile_and_its_cache(models, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTR_CACHE_DIR", str(tmp_path))
    target, draft = models
    calls = []

    def measure():
        calls.append(1)
        return measure_profile(target, ModelDrafter(draft), max_length=3, context=16, repeats=2)

    profile = cached_profile("tiny", measure)
    assert len(profile.target_seconds) == 4 and len(profile.draft_seconds) == 3 and profile.max_length == 3
    assert all(seconds > 0 for seconds in profile.target_seconds + profile.draft_seconds)
    # And on a long context: half the tiny model's 256 positions.
    assert profile.context == 16 and profile.long_context == 128
    assert len(profile.long_target_seconds) == 4 and len(profile.long_draft_seconds) == 3
    assert profile.batch_rows == BATCH_ROWS and len(profile.batch_seconds) == len(BATCH_ROWS)
    assert profile.batch_sequences == BATCH_SEQUENCES and len(profile.sequence_seconds) == len(BATCH_SEQUENCES)
    for seconds in (profile.batch_seconds, profile.sequence_seconds):
        assert all(0 < a <= b for a, b in zip(seconds, seconds[1:]))
    assert profile.head_seconds > 0  # the tiny target runs on spectr's forward: its head is its own
    # a step's own work beside the pass, plain and for every path length, measured on a real generation
    assert len(profile.overhead_seconds) == 4 and all(seconds > 0 for seconds in profile.overhead_seconds)
    assert cached_profile("tiny", measure) == profile and len(calls) == 1  # read back, not measured again
    cached_profile("tiny", measure, refresh=True)
    assert len(calls) == 2


def decode(target, drafter, settings, params, profile, seed=0, tokens=40):
    decoder = Decoder(target, drafter, settings, params, profile)
    steps = list(decoder.stream([3, 17, 42, 8, 25, 3, 17], tokens, torch.Generator().manual_seed(seed)))
    return [t for s in steps for t in s.emitted], steps


@pytest.mark.parametrize("profile", [CHEAP_TREES, DEAR_TREES], ids=["cheap", "dear"])
def test_greedy_equals_plain_greedy(models, profile):
    target, draft = models
    greedy = SamplingParams(temperature=0)
    plain, _ = decode(target, None, DecodeSettings(method="ar"), greedy, None)
    auto, steps = decode(target, ModelDrafter(draft), DecodeSettings(tree="auto", length=4), greedy, profile)
    assert auto == plain
    shapes = {s.shape for s in steps}
    assert ("plain" in shapes) == (profile is DEAR_TREES) and any(s.startswith("L=") for s in shapes)


def test_seeded_runs_repeat_their_choices(models):
    target, draft = models
    params, settings = SamplingParams(temperature=1.0), DecodeSettings(tree="auto", length=4)
    first = decode(target, ModelDrafter(draft), settings, params, CHEAP_TREES, seed=3)
    second = decode(target, ModelDrafter(draft), settings, params, CHEAP_TREES, seed=3)
    assert first[0] == second[0] and [s.shape for s in first[1]] == [s.shape for s in second[1]]


# Drafting, then plain steps, then drafting again: the drafters must stay in step with the text (the head
# through the features it is handed) whatever mix of shapes the planner picks.
MIXED = CostProfile(target_seconds=(0.010, 0.0115, 0.013, 0.0145, 0.016), draft_seconds=(0.001, 0.002, 0.003, 0.004))


def test_every_token_follows_the_target_with_both_drafters(tmp_path):
    from spectr.drafters.trained import load_trained_draft
    from tests.decoder_law import sharpened_head

    hf = law_target()
    target = native_forward(hf, "fp32")
    head = load_trained_draft(sharpened_head(hf, tmp_path), hf, precision="fp32")
    settings = DecodeSettings(tree="auto", length=4)
    for drafter in (ModelDrafter(perturbed_copy(hf)), EagleDrafter(head)):
        exact = check_decoder_law(target, drafter, settings, SamplingParams(temperature=0.7), streams=15,
                                  profile=MIXED)
        assert exact.accepted > exact.steps / 2 and exact.pvalue > P_VALUE_THRESHOLD, exact


def test_every_token_follows_the_target_beside_a_changing_batch(tmp_path, monkeypatch):
    """Paths chosen by a batch's load, which moves between steps (others joining, leaving, drafting): the
    choice is a function of the past, so every token keeps the target's law. The loads swing the choice
    between plain steps and long paths."""
    from spectr.drafters.trained import load_trained_draft
    from tests.decoder_law import sharpened_head

    hf = law_target()
    target = native_forward(hf, "fp32")
    head = load_trained_draft(sharpened_head(hf, tmp_path), hf, precision="fp32")
    profile = batched(CHEAP_TREES, 0.006, 0.0008)
    swings = [None, BatchLoad(15, 15.0, 0.003), BatchLoad(1, 1.0, 0.0), BatchLoad(7, 9.0, 0.002)]
    seen, chosen = [], Counter()
    choose = PathPlanner.choose

    def loads(step):
        seen.append(swings[(step * 7 + step // 3) % len(swings)])
        return seen[-1]

    def counted(self, context=None, load=None):
        length = choose(self, context, load)
        chosen[length] += 1
        return length

    monkeypatch.setattr(PathPlanner, "choose", counted)

    for drafter in (ModelDrafter(perturbed_copy(hf)), EagleDrafter(head)):
        exact = check_decoder_law(target, drafter, DecodeSettings(tree="auto", length=4), SamplingParams(temperature=0.7),
                                  streams=15, profile=profile, loads=loads)
        assert exact.pvalue > P_VALUE_THRESHOLD, exact
    assert {type(load) for load in seen} == {type(None), BatchLoad}
    total = sum(chosen.values())
    assert chosen[0] > total / 5 and chosen[2] + chosen[3] + chosen[4] > total / 5, chosen  # plain and long


def test_settings_for_auto():
    assert DecodeSettings(tree="auto").rule_name == "block" and DecodeSettings(tree="auto", k=4).num_drafts == 1
    assert DecodeSettings(tree="auto", rule="standard").rule_candidates == 1
    with pytest.raises(InvalidInputError, match="takes one draft"):
        DecodeSettings(k=2, tree="iid", rule="block")
    with pytest.raises(InvalidInputError, match="needs method 'sd' or 'spectr'"):
        DecodeSettings(method="ar", tree="auto")
