"""α*: the sorted-prefix formula equals brute force over every subset, the transport LP agrees with both,
and its plan is a valid coupling."""

import pytest
import torch

from spectr.errors import InvalidInputError
from spectr.rules import optimal_acceptance, optimal_transport_plan
from spectr.rules.optimal import optimal_acceptance_by_subsets
from tests.rules.cases import distribution_pairs


@pytest.mark.parametrize("vocab,k", [(2, 1), (2, 3), (3, 2), (3, 3), (4, 2), (5, 2)])
def test_lp_value_equals_subset_formula(vocab, k):
    for case, target, draft in distribution_pairs(vocab, num_random=12):
        plan = optimal_transport_plan(target, draft, k)
        assert plan.acceptance == pytest.approx(optimal_acceptance(target, draft, k), abs=1e-7), case
        tuple_probs = draft[plan.tuples].prod(-1)
        torch.testing.assert_close(plan.coupling.sum(-1), tuple_probs, atol=1e-7, rtol=0)
        torch.testing.assert_close(plan.coupling.sum(0), target, atol=1e-7, rtol=0)
        hits = (plan.tuples[:, :, None] == torch.arange(vocab)).any(1)
        assert float(plan.coupling[hits].sum()) == pytest.approx(plan.acceptance, abs=1e-7)


def test_optimal_value_bounds():
    target = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    draft = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    values = [optimal_acceptance(target, draft, k) for k in range(1, 6)]
    assert values[0] == pytest.approx(float(torch.minimum(target, draft).sum()))
    assert values == sorted(values) and values[-1] <= 1.0


@pytest.mark.parametrize("vocab", [2, 3, 5, 8, 12])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_sorted_prefixes_reach_the_optimum(vocab, k):
    """The minimising set is always one of the prefixes by p/q (rules/optimal.py): equal to brute force."""
    for case, target, draft in distribution_pairs(vocab, num_random=40 if vocab <= 8 else 12):
        assert optimal_acceptance(target, draft, k) == pytest.approx(
            optimal_acceptance_by_subsets(target, draft, k), abs=1e-12), case


def test_a_wrong_order_misses_the_optimum():
    """Negative control: prefixes by p alone (not p/q) do miss the best set, so the test above can fail."""
    misses = 0
    for _, target, draft in distribution_pairs(6, num_random=40):
        order = target.argsort()
        by_p = float(torch.clamp((target[order].cumsum(0) + 1 - draft[order].cumsum(0) ** 3).min(), max=1.0))
        misses += by_p > optimal_acceptance_by_subsets(target, draft, 3) + 1e-6
    assert misses > 5


def test_full_vocabulary_is_fast_and_within_bounds():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(49152, generator=generator, dtype=torch.float64) ** 8
    draft = (target + 0.3 * torch.rand(49152, generator=generator, dtype=torch.float64) ** 8)
    target, draft = target / target.sum(), draft / draft.sum()
    values = [optimal_acceptance(target, draft, k) for k in (1, 2, 4)]
    assert values[0] == pytest.approx(float(torch.minimum(target, draft).sum()), abs=1e-12)
    assert values == sorted(values) and values[-1] <= 1.0


def test_size_limits_are_clear():
    big = torch.full((21,), 1 / 21, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="2\\^V"):
        optimal_acceptance_by_subsets(big, big, 2)
    with pytest.raises(InvalidInputError, match="variables"):
        optimal_transport_plan(big, big, 5)
