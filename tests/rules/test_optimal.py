"""The transport LP agrees with the subset formula for α*, and its plan is a valid coupling."""

import pytest
import torch

from spectr.errors import InvalidInputError
from spectr.rules import optimal_acceptance, optimal_transport_plan
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


def test_size_limits_are_clear():
    big = torch.full((21,), 1 / 21, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="2\\^V"):
        optimal_acceptance(big, big, 2)
    with pytest.raises(InvalidInputError, match="variables"):
        optimal_transport_plan(big, big, 5)
