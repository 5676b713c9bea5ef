"""The two-step importance rule: step 1's closed-form law against enumeration, exactness, negative controls."""

import itertools

from hypothesis import given, settings, strategies as st
import pytest
import torch

from spectr.rules import RULES, Rule, SelectionPlan, optimal_acceptance
from spectr.rules.base import normalize_or, ratio_accept_probs
from spectr.rules.importance import ImportanceRule, eligibility, sequential_accepts
from tests.rules.cases import distribution_pairs, exact_output_law
from tests.rules.test_statistical import STAT_CASES, _pair, _run
from tests.stats import P_VALUE_THRESHOLD, chi_square_pvalue

RULE = RULES["importance"]


def test_worked_example():
    target, draft = _pair([1, 0], [1, 1])
    torch.testing.assert_close(RULE.selection_law(target, draft, 2), torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert RULE.acceptance_probability(target, draft, 2) == pytest.approx(0.75) == optimal_acceptance(target, draft, 2)


def _enumerated_pick_law(step, draft, k):
    """Step 1's token law summed over every candidate tuple, from the per-tuple pick chances."""
    law = torch.zeros_like(draft)
    support = torch.nonzero(draft > 0).flatten().tolist()
    for tuple_ in itertools.product(support, repeat=k):
        candidates = torch.tensor([tuple_])
        chance = step.pick_chances(candidates)[0]
        assert float(chance.sum()) == pytest.approx(1.0)
        law.scatter_add_(0, candidates[0], draft[candidates[0]].prod() * chance)
    return law


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("tau,mix", [(0.0, 0.0), (0.7, 0.0), (2.0, 0.0), (0.7, 0.5), (0.0, 1.0)])
def test_closed_form_selection_law_is_the_enumerated_one(k, tau, mix):
    rule = ImportanceRule(thresholds=(tau / k,), mixtures=(mix,))
    for case, target, draft in distribution_pairs(4, num_random=12):
        step = rule.step_one(target[None], draft[None], k)
        assert float(step.tau[0]) == pytest.approx(tau) and float(step.mix[0]) == mix
        torch.testing.assert_close(step.law[0], _enumerated_pick_law(step, draft, k), atol=1e-12, rtol=0,
                                   msg=lambda m: f"{case}: {m}")


def test_identical_laws_are_always_accepted():
    """p = q: only λ = 1 (take the first candidate, law q) reaches α* = 1; the scan alone would not."""
    for case, target, _ in distribution_pairs(6):
        for k in (2, 4):
            assert RULE.acceptance_probability(target, target, k) == pytest.approx(1.0, abs=1e-6), case


def test_k_one_is_the_standard_rule():
    for case, target, draft in distribution_pairs(5):
        torch.testing.assert_close(RULE.selection_law(target, draft, 1), draft, atol=1e-12, rtol=0)
        assert RULE.acceptance_probability(target, draft, 1) == pytest.approx(float(torch.minimum(target, draft).sum()))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data(), vocab=st.integers(2, 12), k=st.integers(2, 6))
def test_never_above_the_optimum_and_the_grid_is_used(data, vocab, k):
    weights = st.lists(st.sampled_from([0.0, 1e-4, 0.01, 0.1, 0.3, 1.0, 3.0]), min_size=vocab, max_size=vocab)
    target = torch.tensor(data.draw(weights.filter(any)), dtype=torch.float64)
    draft = torch.tensor(data.draw(weights.filter(any)), dtype=torch.float64)
    target, draft = target / target.sum(), draft / draft.sum()
    alpha = RULE.acceptance_probability(target, draft, k)
    assert alpha <= optimal_acceptance(target, draft, k) + 1e-12
    # From k = 3 the chosen τ is the best of the grid: no single threshold does better.
    for tau in (0.0, 0.25, 0.5) if k >= 3 else ():  # as τ / k
        single = ImportanceRule(thresholds=(tau,)).acceptance_probability(target, draft, k)
        assert single <= alpha + 1e-6  # the grid is scored in float32


def test_beats_kseq_on_skewed_drafts():
    """Where the draft over-proposes a token the target rarely wants, the importance order pays: K-SEQ
    scales every ratio by one ρ, step 1 prefers the under-proposed candidates."""
    target, draft = _pair([0.1, 0.6, 0.3], [0.6, 0.2, 0.2])
    for k in (2, 3, 4):
        alpha = RULE.acceptance_probability(target, draft, k)
        assert alpha == pytest.approx(optimal_acceptance(target, draft, k), abs=1e-12)  # 0.74, 0.884, 0.970
        assert alpha > RULES["kseq"].acceptance_probability(target, draft, k) + 0.03  # 0.708, 0.790, 0.850


class StepTwoAgainstDraft(Rule):
    """Wrong on purpose: step 2 judges the pick against q, as if step 1 had picked a random candidate."""

    name = "importance-against-q"

    def plan(self, target_probs, draft_probs, candidates):
        target, draft = target_probs.double(), draft_probs.double()
        pick = RULE.step_one(target, draft, candidates.shape[-1]).pick_chances(candidates)
        keep = ratio_accept_probs(target.gather(-1, candidates), draft.gather(-1, candidates))
        residual = normalize_or((target - draft).clamp_min(0), target)
        return SelectionPlan(sequential_accepts(pick * keep), residual)

    def acceptance_probability(self, target_probs, draft_probs, k):
        return None


class FallbackToFirst(Rule):
    """Wrong on purpose: when no candidate is eligible, step 1 takes the first in order, not the last."""

    name = "importance-fallback-first"

    def plan(self, target_probs, draft_probs, candidates):
        target, draft = target_probs.double(), draft_probs.double()
        step = RULE.step_one(target, draft, candidates.shape[-1])
        assert bool((step.mix == 0).all()) and bool((step.tau > 0).all())  # where the fallback matters
        law = step.law
        r = step.rank.gather(-1, candidates)
        a = eligibility(step.sorted_ratio.gather(-1, r), step.tau).double()
        position = torch.argsort(r, dim=-1, stable=True)
        sorted_a = a.gather(-1, position)
        none_before = torch.cumprod(torch.cat([torch.ones_like(sorted_a[:, :1]), 1 - sorted_a[:, :-1]], -1), -1)
        chance = sorted_a * none_before
        chance[:, 0] += none_before[:, -1] * (1 - sorted_a[:, -1])
        pick = torch.empty_like(chance).scatter_(-1, position, chance)
        keep = ratio_accept_probs(target.gather(-1, candidates), law.gather(-1, candidates))
        return SelectionPlan(sequential_accepts(pick * keep), normalize_or((target - law).clamp_min(0), target))

    def acceptance_probability(self, target_probs, draft_probs, k):
        return None


# A pair where the best τ is positive, so that the fallback matters.
THINNED = _pair([0.30, 0.25, 0.20, 0.15, 0.10], [0.05, 0.10, 0.15, 0.30, 0.40])


@pytest.mark.parametrize("wrong", [StepTwoAgainstDraft(), FallbackToFirst()])
def test_analytic_check_rejects_wrong_variants(wrong):
    target, draft = THINNED
    law, _ = exact_output_law(wrong, target, draft, 4)
    assert (law - target).abs().max() > 1e-3
    right, _ = exact_output_law(RULE, target, draft, 4)
    torch.testing.assert_close(right, target, atol=1e-12, rtol=0)


@pytest.mark.parametrize("wrong", [StepTwoAgainstDraft(), FallbackToFirst()])
def test_chi_square_rejects_wrong_variants(wrong):
    target, draft = THINNED
    tokens, _ = _run(wrong, target, draft, 4, seed=1234)
    assert chi_square_pvalue(tokens, target) < P_VALUE_THRESHOLD
    tokens, _ = _run(RULE, target, draft, 4, seed=1234)
    assert chi_square_pvalue(tokens, target) > P_VALUE_THRESHOLD


def test_thinning_is_chosen_where_it_pays():
    target, draft = THINNED
    rule_at_zero = ImportanceRule(thresholds=(0.0,))
    assert RULE.acceptance_probability(target, draft, 4) > rule_at_zero.acceptance_probability(target, draft, 4) + 1e-3


def test_float32_inputs_give_a_float32_plan():
    target, draft = (t.float() for t in STAT_CASES["dirichlet-like"])
    candidates = torch.tensor([[0, 1, 3]])
    plan = RULE.plan(target[None], draft[None], candidates)
    assert plan.accept_probs.dtype == plan.residual_probs.dtype == torch.float32
