"""Statistical exactness: seeded draws through the real samplers, chi-square against p."""

import pytest
import torch

from spectr.rules import RULES, Rule, SelectionPlan
from tests.rules.cases import one_hot
from tests.rules.test_exactness import KSeqAtRhoOne, KSeqWithStandardResidual
from tests.stats import P_VALUE_THRESHOLD, binomial_z, chi_square_pvalue

DRAWS = 200_000


def _pair(target, draft):
    target = torch.tensor(target, dtype=torch.float64)
    draft = torch.tensor(draft, dtype=torch.float64)
    return target / target.sum(), draft / draft.sum()


STAT_CASES = {
    "dirichlet-like": _pair([0.30, 0.05, 0.20, 0.01, 0.34, 0.10], [0.05, 0.40, 0.10, 0.25, 0.05, 0.15]),
    "peaked target": _pair([0.90, 0.04, 0.03, 0.02, 0.01], [0.20, 0.20, 0.20, 0.20, 0.20]),
    "q zero where p > 0": _pair([0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]),
    "disjoint": _pair([0.0, 0.0, 0.6, 0.4], [0.7, 0.3, 0.0, 0.0]),
    "p = q": _pair([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]),
    "one-hot draft": (_pair([0.5, 0.3, 0.2], [1, 1, 1])[0], one_hot(3, 1)),
    "one-hot target": (one_hot(4, 2), _pair([1, 1, 1, 1], [1, 1, 1, 1])[1]),
}
RULE_KS = [("standard", 1), ("kseq", 2), ("kseq", 4), ("specinfer", 2), ("specinfer", 4), ("rsd", 2), ("rsd", 3),
            ("importance", 2), ("importance", 4)]


def _run(rule: Rule, target, draft, k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    targets, drafts = target.expand(DRAWS, -1), draft.expand(DRAWS, -1)
    candidates = rule.draw_candidates_batch(drafts, k, generator)
    return rule.select_batch(targets, drafts, candidates, generator)


@pytest.mark.parametrize("case", list(STAT_CASES))
@pytest.mark.parametrize("rule_name,k", RULE_KS)
def test_emitted_tokens_follow_target(rule_name, k, case):
    target, draft = STAT_CASES[case]
    rule = RULES[rule_name]
    tokens, accepted = _run(rule, target, draft, k, seed=1234)
    assert chi_square_pvalue(tokens, target) > P_VALUE_THRESHOLD
    expected_acceptance = rule.acceptance_probability(target, draft, k)
    if expected_acceptance is not None:
        assert binomial_z(int(accepted.sum()), DRAWS, expected_acceptance) < 4.5


class AlwaysAccept(Rule):
    """Wrong on purpose: emits the first candidate, i.e. samples the draft."""

    name = "always-accept"

    def plan(self, target_probs, draft_probs, candidates):
        accept = torch.ones(candidates.shape, dtype=target_probs.dtype)
        return SelectionPlan(accept_probs=accept, residual_probs=target_probs)

    def acceptance_probability(self, target_probs, draft_probs, k):
        return 1.0


@pytest.mark.parametrize("wrong", [KSeqWithStandardResidual(), KSeqAtRhoOne(), AlwaysAccept()])
def test_chi_square_rejects_wrong_rules(wrong):
    target, draft = STAT_CASES["dirichlet-like"]
    tokens, _ = _run(wrong, target, draft, 4, seed=1234)
    assert chi_square_pvalue(tokens, target) < P_VALUE_THRESHOLD


@pytest.mark.parametrize("rule_name,k", [("kseq", 3), ("rsd", 3)])
def test_candidates_follow_their_stated_law(rule_name, k):
    """The tuple law the analytic tests enumerate is the law draw_candidates really has."""
    rule = RULES[rule_name]
    _, draft = STAT_CASES["dirichlet-like"]
    vocab = draft.shape[0]
    tuples, weights = rule.candidate_law(draft, k)
    generator = torch.Generator().manual_seed(99)
    drawn = rule.draw_candidates_batch(draft.expand(DRAWS, -1), k, generator)
    powers = vocab ** torch.arange(k - 1, -1, -1)
    expected = torch.zeros(vocab**k, dtype=torch.float64).index_add(0, (tuples * powers).sum(-1), weights)
    assert chi_square_pvalue((drawn * powers).sum(-1), expected) > P_VALUE_THRESHOLD
