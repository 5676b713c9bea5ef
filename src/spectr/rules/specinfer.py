"""SpecInfer's multi-round speculative sampling (Miao et al. 2024, Algorithm 2; SPECTR.md §1.4).

Candidates X_1..X_k are i.i.d. from q. With p_1 = p, candidate X_i is accepted
with probability min(1, p_i(X_i) / q(X_i)); on rejection the target moves to
p_{i+1} ∝ max(0, p_i − q). After k rejections the token is drawn from p_{k+1}.
Round i is a standard speculative step from p_i, so by induction the output
has law p. The p_i do not depend on the candidates, hence the closed-form
acceptance 1 − Π_i (1 − Σ min(p_i, q)).
"""

import torch
from torch import Tensor

from spectr.rules.base import Rule, SelectionPlan, normalize_or, ratio_accept_probs
from spectr.rules.checks import check_num_candidates, check_pair


def specinfer_targets(target_probs: Tensor, draft_probs: Tensor, k: int) -> list[Tensor]:
    """[p_1, ..., p_{k+1}], each [N, V]: the target each round compares against."""
    targets = [target_probs]
    for _ in range(k):
        previous = targets[-1]
        targets.append(normalize_or((previous - draft_probs).clamp_min(0), previous))
    return targets


class SpecInferRule(Rule):
    name = "specinfer"

    def plan(self, target_probs: Tensor, draft_probs: Tensor, candidates: Tensor) -> SelectionPlan:
        k = candidates.shape[-1]
        targets = specinfer_targets(target_probs, draft_probs, k)
        drafted = draft_probs.gather(-1, candidates)  # [N, k]
        accept = torch.stack(
            [ratio_accept_probs(targets[i].gather(-1, candidates[:, i : i + 1])[:, 0], drafted[:, i]) for i in range(k)],
            dim=-1,
        )
        return SelectionPlan(accept_probs=accept, residual_probs=targets[k])

    def acceptance_probability(self, target_probs: Tensor, draft_probs: Tensor, k: int) -> float:
        k = check_num_candidates(k)
        check_pair(target_probs, draft_probs, ndim=1)
        targets = specinfer_targets(target_probs[None], draft_probs[None], k)
        all_rejected = torch.ones((), dtype=target_probs.dtype)
        for round_target in targets[:k]:
            all_rejected = all_rejected * (1 - torch.minimum(round_target[0], draft_probs).sum())
        return float(1 - all_rejected)
