"""Analytic exactness (SPECTR.md §3): enumerate every candidate tuple, mix the exact laws, compare with p."""

from hypothesis import given, settings, strategies as st
import pytest
import torch

from spectr.rules import RULES, Rule, SelectionPlan
from spectr.rules.base import normalize_or
from spectr.rules.kseq import KSeqRule, kseq_rho_star
from tests.rules.cases import distribution_pairs, exact_output_law

RULE_KS = [(name, k) for name, rule in RULES.items() for k in range(1, (rule.max_candidates or 4) + 1)]


@pytest.mark.parametrize("vocab", [2, 3, 4, 5])
@pytest.mark.parametrize("rule_name,k", RULE_KS)
def test_output_law_is_target(rule_name, k, vocab):
    rule = RULES[rule_name]
    for case, target, draft in distribution_pairs(vocab):
        law, acceptance = exact_output_law(rule, target, draft, k)
        torch.testing.assert_close(law, target, atol=1e-9, rtol=0, msg=lambda m: f"{case}: {m}")
        closed_form = rule.acceptance_probability(target, draft, k)
        if closed_form is not None:
            assert closed_form == pytest.approx(acceptance, abs=1e-9), case


@pytest.mark.parametrize("rule_name", ["kseq", "specinfer", "rsd", "importance"])
@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    data=st.data(),
    vocab=st.integers(2, 6),
    k=st.integers(1, 4),
)
def test_output_law_is_target_for_arbitrary_pairs(rule_name, data, vocab, k):
    weights = st.lists(st.sampled_from([0.0, 0.0, 1e-6, 0.01, 0.1, 0.3, 1.0, 3.0]), min_size=vocab, max_size=vocab)
    target = torch.tensor(data.draw(weights.filter(any)), dtype=torch.float64)
    draft = torch.tensor(data.draw(weights.filter(any)), dtype=torch.float64)
    target, draft = target / target.sum(), draft / draft.sum()
    law, _ = exact_output_law(RULES[rule_name], target, draft, k)
    torch.testing.assert_close(law, target, atol=1e-9, rtol=0)


def test_exact_at_coarse_rho_precision():
    """The general residual keeps K-SEQ exact wherever the bisection stops (on the valid side)."""
    coarse = KSeqRule(tolerance=0.3)
    for case, target, draft in distribution_pairs(4):
        law, _ = exact_output_law(coarse, target, draft, 3)
        torch.testing.assert_close(law, target, atol=1e-9, rtol=0, msg=lambda m: f"{case}: {m}")


class KSeqWithStandardResidual(Rule):
    """Wrong on purpose: K-SEQ's accept chances with the k = 1 residual max(0, p − q)."""

    name = "kseq-wrong-residual"

    def plan(self, target_probs, draft_probs, candidates):
        right = RULES["kseq"].plan(target_probs, draft_probs, candidates)
        residual = normalize_or((target_probs - draft_probs).clamp_min(0), target_probs)
        return SelectionPlan(accept_probs=right.accept_probs, residual_probs=residual)

    def acceptance_probability(self, target_probs, draft_probs, k):
        return None


class KSeqAtRhoOne(Rule):
    """Wrong on purpose: K-SEQ run at ρ = 1 whatever k (invalid for k > 1)."""

    name = "kseq-rho-one"

    def plan(self, target_probs, draft_probs, candidates):
        from spectr.rules.kseq import kseq_plan

        rho = torch.ones(target_probs.shape[0], dtype=target_probs.dtype)
        return kseq_plan(target_probs, draft_probs, candidates, rho)

    def acceptance_probability(self, target_probs, draft_probs, k):
        return None


@pytest.mark.parametrize("wrong", [KSeqWithStandardResidual(), KSeqAtRhoOne()])
def test_analytic_check_rejects_wrong_rules(wrong):
    target = torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64)
    draft = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    assert float(kseq_rho_star(target[None], draft[None], 3)[0]) > 1
    law, _ = exact_output_law(wrong, target, draft, 3)
    assert (law - target).abs().max() > 1e-3
