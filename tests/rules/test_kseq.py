"""K-SEQ's own claims: the worked example, the (1 − 1/e) bound, k = 1 = standard, edge cases."""

import math

import pytest
import torch

from spectr.rules import RULES, KSeqRule, kseq_rho_star, optimal_acceptance
from tests.rules.cases import one_hot

KSEQ = RULES["kseq"]


def test_worked_example():
    target = torch.tensor([1.0, 0.0], dtype=torch.float64)
    draft = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert KSEQ.rho_star(target, draft, 2) == pytest.approx(1.5, abs=1e-6)
    assert KSEQ.acceptance_probability(target, draft, 2) == pytest.approx(0.75, abs=1e-12)
    assert optimal_acceptance(target, draft, 2) == pytest.approx(0.75, abs=1e-12)


def test_within_one_minus_one_over_e_of_optimal():
    generator = torch.Generator().manual_seed(7)
    worst = math.inf
    for case in range(1200):
        vocab = 2 + case % 9
        k = 1 + (case // 9) % 8
        concentration = [0.05, 0.2, 1.0, 5.0][case % 4]
        alpha = torch.full((vocab,), concentration, dtype=torch.float64)
        target = torch._standard_gamma(alpha, generator=generator)
        draft = torch._standard_gamma(alpha, generator=generator)
        if target.sum() == 0 or draft.sum() == 0:
            continue
        target, draft = target / target.sum(), draft / draft.sum()
        best = optimal_acceptance(target, draft, k)
        achieved = KSEQ.acceptance_probability(target, draft, k)
        assert achieved <= best + 1e-9, (target, draft, k)
        assert achieved >= (1 - 1 / math.e) * best - 1e-12, (target, draft, k)
        worst = min(worst, achieved / best if best > 0 else 1.0)
    assert worst < 1.0  # the bound was tested on cases where K-SEQ is not already optimal


def test_k_one_is_standard():
    generator = torch.Generator().manual_seed(3)
    target = torch.distributions.Dirichlet(torch.ones(20, 7, dtype=torch.float64)).sample()
    draft = torch.distributions.Dirichlet(torch.ones(20, 7, dtype=torch.float64)).sample()
    candidates = torch.multinomial(draft, 1, generator=generator)
    kseq_plan = RULES["kseq"].plan(target, draft, candidates)
    standard_plan = RULES["standard"].plan(target, draft, candidates)
    torch.testing.assert_close(kseq_plan.accept_probs, standard_plan.accept_probs, atol=1e-12, rtol=0)
    torch.testing.assert_close(kseq_plan.residual_probs, standard_plan.residual_probs, atol=1e-12, rtol=0)
    assert (kseq_rho_star(target, draft, 1) == 1).all()
    for row in range(20):
        assert RULES["kseq"].acceptance_probability(target[row], draft[row], 1) == pytest.approx(
            RULES["standard"].acceptance_probability(target[row], draft[row], 1), abs=1e-12
        )
    first = RULES["kseq"].select_batch(target, draft, candidates, torch.Generator().manual_seed(5))
    second = RULES["standard"].select_batch(target, draft, candidates, torch.Generator().manual_seed(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_rho_star_is_smallest_valid():
    generator = torch.Generator().manual_seed(11)
    target = torch.distributions.Dirichlet(torch.full((50, 9), 0.3, dtype=torch.float64)).sample()
    draft = torch.distributions.Dirichlet(torch.full((50, 9), 0.3, dtype=torch.float64)).sample()
    del generator
    for k in (2, 3, 5, 8):
        rho = kseq_rho_star(target, draft, k)
        assert ((rho >= 1) & (rho <= k)).all()

        def gap(r):
            beta = torch.minimum(draft, target / r[:, None]).sum(-1)
            return r * beta - (1 - (1 - beta) ** k)

        assert (gap(rho) >= -1e-12).all()  # valid
        below = (rho - 1e-5).clamp_min(1)
        assert ((gap(below) < 0) | (rho - 1e-5 < 1)).all()  # and (nearly) the smallest


@pytest.mark.parametrize("k", [1, 2, 4])
def test_edge_cases(k):
    ramp = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    # p = q: every candidate accepted.
    assert KSEQ.acceptance_probability(ramp, ramp, k) == pytest.approx(1.0, abs=1e-9)
    # Disjoint supports: β = 0, nothing accepted, residual = p.
    law, accept = KSEQ.output_law(one_hot(4, 0), one_hot(4, 3), torch.full((k,), 3))
    assert accept == 0.0 and torch.allclose(law, one_hot(4, 0))
    # One-hot draft (an n-gram proposal): acceptance is p(token), whatever k -- exactly at
    # ρ*, and short of it only by what the bisection's stopping width costs.
    precise = KSeqRule(tolerance=1e-13)
    assert precise.acceptance_probability(ramp, one_hot(4, 2), k) == pytest.approx(0.3, abs=1e-9)
    assert KSEQ.acceptance_probability(ramp, one_hot(4, 2), k) == pytest.approx(0.3, abs=1e-6)
    law, accept = precise.output_law(ramp, one_hot(4, 2), torch.full((k,), 2))
    assert accept == pytest.approx(0.3, abs=1e-9) and torch.allclose(law, ramp, atol=1e-12)
    # Single-token support on both sides.
    token, accepted = KSEQ.select(one_hot(4, 1), one_hot(4, 1), torch.full((k,), 1))
    assert (token, accepted) == (1, True)
