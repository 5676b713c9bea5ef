"""Token-level selection rules: k draft candidates in, one exactly target-distributed token out.

    from spectr.rules import RULES, optimal_acceptance
    rule = RULES["kseq"]
    candidates = rule.draw_candidates(draft_probs, k, generator)               # [k]
    token, accepted = rule.select(target_probs, draft_probs, candidates, generator)
    alpha = rule.acceptance_probability(target_probs, draft_probs, k)
    alpha_star = optimal_acceptance(target_probs, draft_probs, k)

See base.py for the glossary and each rule's module for its algorithm.
"""

from spectr.rules.base import Rule, SelectionPlan
from spectr.rules.block import BlockRule
from spectr.rules.importance import ImportanceRule
from spectr.rules.kseq import KSeqRule, kseq_rho_star
from spectr.rules.optimal import TransportPlan, optimal_acceptance, optimal_transport_plan
from spectr.rules.rsd import RecursiveRule
from spectr.rules.specinfer import SpecInferRule
from spectr.rules.standard import StandardRule

RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (StandardRule(), KSeqRule(), SpecInferRule(), RecursiveRule(), BlockRule(), ImportanceRule())
}

__all__ = [
    "RULES",
    "BlockRule",
    "ImportanceRule",
    "KSeqRule",
    "RecursiveRule",
    "Rule",
    "SelectionPlan",
    "SpecInferRule",
    "StandardRule",
    "TransportPlan",
    "kseq_rho_star",
    "optimal_acceptance",
    "optimal_transport_plan",
]
