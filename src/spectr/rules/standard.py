"""Standard speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023).

One candidate X ~ q. Accept it with probability min(1, p(X) / q(X)); otherwise
sample from the residual r ∝ max(0, p − q). Acceptance = Σ min(p, q) = 1 − TV(p, q).
This is the k = 1 baseline every multi-draft rule must beat.
"""

import torch
from torch import Tensor

from spectr.errors import InvalidInputError
from spectr.rules.base import Rule, SelectionPlan, normalize_or, ratio_accept_probs
from spectr.rules.checks import check_num_candidates, check_pair


class StandardRule(Rule):
    name = "standard"
    max_candidates = 1

    def check_k(self, k: int) -> int:
        k = check_num_candidates(k)
        if k != 1:
            raise InvalidInputError(
                f"rule '{self.name}' takes exactly one candidate (k = 1), got k = {k}; "
                "use 'kseq', 'specinfer' or 'rsd' for several drafts"
            )
        return k

    def plan(self, target_probs: Tensor, draft_probs: Tensor, candidates: Tensor) -> SelectionPlan:
        accept = ratio_accept_probs(target_probs.gather(-1, candidates), draft_probs.gather(-1, candidates))
        residual = normalize_or((target_probs - draft_probs).clamp_min(0), target_probs)
        return SelectionPlan(accept_probs=accept, residual_probs=residual)

    def acceptance_probability(self, target_probs: Tensor, draft_probs: Tensor, k: int) -> float:
        self.check_k(k)
        check_pair(target_probs, draft_probs, ndim=1)
        return float(torch.minimum(target_probs, draft_probs).sum())
