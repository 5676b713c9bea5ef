"""Bad input raises a ValueError that names the problem, for every rule."""

import pytest
import torch

from spectr.errors import InvalidInputError, SpectrError
from spectr.rules import RULES, optimal_acceptance

GOOD = torch.tensor([0.2, 0.3, 0.5])
CANDIDATES = torch.tensor([1])


def _bad(values):
    return torch.tensor(values)


@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize(
    "target,draft,message",
    [
        (_bad([0.2, float("nan"), 0.8]), GOOD, "target_probs has non-finite"),
        (GOOD, _bad([0.2, float("inf"), 0.8]), "draft_probs has non-finite"),
        (_bad([-0.1, 0.6, 0.5]), GOOD, "target_probs has negative"),
        (GOOD, _bad([0.2, 0.3, 0.6]), "draft_probs must sum to 1"),
        (GOOD, torch.tensor([0.5, 0.5]), "same shape"),
        (GOOD[None], GOOD[None], "shape \\[vocab\\]"),
        (torch.tensor([1, 0, 0]), GOOD, "floating-point"),
        ([0.2, 0.3, 0.5], GOOD, "torch.Tensor"),
    ],
)
def test_bad_distributions(rule_name, target, draft, message):
    rule = RULES[rule_name]
    with pytest.raises(InvalidInputError, match=message):
        rule.select(target, draft, CANDIDATES)
    with pytest.raises(ValueError, match=message):
        rule.acceptance_probability(target, draft, 1)


@pytest.mark.parametrize("rule_name", list(RULES))
def test_bad_candidates_and_k(rule_name):
    rule = RULES[rule_name]
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        rule.select(GOOD, GOOD, torch.tensor([3]))
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        rule.select(GOOD, GOOD, torch.tensor([-1]))
    with pytest.raises(InvalidInputError, match="draft probability 0"):
        rule.select(GOOD, torch.tensor([0.0, 0.5, 0.5]), torch.tensor([0]))
    with pytest.raises(InvalidInputError, match="integer tensor"):
        rule.select(GOOD, GOOD, torch.tensor([1.0]))
    with pytest.raises(InvalidInputError, match="at least one candidate"):
        rule.select(GOOD, GOOD, torch.tensor([], dtype=torch.long))
    for k in (0, -2):
        with pytest.raises(InvalidInputError, match="must be >= 1"):
            rule.draw_candidates(GOOD, k)
        with pytest.raises(InvalidInputError, match="must be >= 1"):
            rule.acceptance_probability(GOOD, GOOD, k)
    with pytest.raises(InvalidInputError, match="must be an int"):
        rule.draw_candidates(GOOD, 2.0)
    with pytest.raises(InvalidInputError, match="draft_probs has negative"):
        rule.draw_candidates(_bad([-0.1, 0.6, 0.5]), 1)


def test_standard_refuses_several_candidates():
    with pytest.raises(InvalidInputError, match="exactly one candidate"):
        RULES["standard"].select(GOOD, GOOD, torch.tensor([0, 1]))
    with pytest.raises(InvalidInputError, match="exactly one candidate"):
        RULES["standard"].draw_candidates(GOOD, 2)


def test_rsd_refuses_repeated_candidates():
    with pytest.raises(InvalidInputError, match="distinct candidates"):
        RULES["rsd"].select(GOOD, GOOD, torch.tensor([1, 1]))


def test_errors_are_spectr_errors():
    with pytest.raises(SpectrError):
        optimal_acceptance(GOOD, GOOD, 0)
