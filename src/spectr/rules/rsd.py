"""Recursive speculative decoding (Jeon et al. 2024, "RSD with sampling without replacement").

Candidates are drawn *without* replacement from q, by Gumbel-top-k: the k
largest of log q(x) + G_x (G_x i.i.d. Gumbel) come out in the order of
sequential sampling without replacement. With p_1 = p, q_1 = q, candidate X_i is
accepted with probability min(1, p_i(X_i) / q_i(X_i)); on rejection
    p_{i+1} ∝ max(0, p_i − q_i),   q_{i+1} = q_i with X_i removed, renormalised,
which is exactly the law of X_{i+1} given the rejected X_1..X_i. Round i is a
standard speculative step from p_i, so the output has law p. After the last
candidate the token is drawn from p_{k+1}.

When q has fewer than k tokens in its support, only that many candidates
exist: `draw_candidates` returns min(k, |supp q|) tokens. The p_i depend on the
candidates drawn, so there is no closed-form acceptance (None for k > 1).
"""

import itertools

import torch
from torch import Tensor

from spectr.errors import InvalidInputError
from spectr.rules.base import Rule, SelectionPlan, normalize_or, ratio_accept_probs
from spectr.rules.checks import check_draft, check_num_candidates, check_pair


class RecursiveRule(Rule):
    name = "rsd"

    def draw_candidates_batch(
        self, draft_probs: Tensor, k: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """min(k, smallest support) candidates per row of q [N, V], without replacement. [N, k']"""
        k = check_num_candidates(k)
        check_draft(draft_probs, ndim=2)
        support = int((draft_probs > 0).sum(-1).min())
        uniforms = torch.rand(draft_probs.shape, generator=generator, dtype=draft_probs.dtype)
        gumbel = -torch.log(-torch.log(uniforms.clamp_min(torch.finfo(draft_probs.dtype).tiny)))
        keys = torch.where(draft_probs > 0, draft_probs.log() + gumbel, float("-inf"))
        return keys.topk(min(k, support), dim=-1).indices

    def candidate_law(self, draft_probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Every ordered tuple of min(k, |supp q|) distinct support tokens, with its probability."""
        k = check_num_candidates(k)
        support = torch.nonzero(draft_probs > 0).squeeze(-1).tolist()
        length = min(k, len(support))
        tuples = torch.tensor(list(itertools.permutations(support, length)), dtype=torch.long)
        weights = torch.ones(tuples.shape[0], dtype=draft_probs.dtype)
        remaining = draft_probs.expand(tuples.shape[0], -1).clone()  # [M, V] q over tokens not yet drawn
        for i in range(length):
            token = tuples[:, i : i + 1]
            # The remaining mass is summed, not taken as 1 − (drawn mass): no cancellation.
            weights = weights * remaining.gather(-1, token)[:, 0] / remaining.sum(-1)
            remaining = remaining.scatter(-1, token, 0.0)
        return tuples, weights

    def plan(self, target_probs: Tensor, draft_probs: Tensor, candidates: Tensor) -> SelectionPlan:
        round_target, round_draft = target_probs, draft_probs  # p_i, q_i [N, V]
        accepts = []
        for i in range(candidates.shape[-1]):
            token = candidates[:, i : i + 1]  # [N, 1]
            accepts.append(
                ratio_accept_probs(round_target.gather(-1, token)[:, 0], round_draft.gather(-1, token)[:, 0])
            )
            round_target = normalize_or((round_target - round_draft).clamp_min(0), round_target)
            round_draft = normalize_or(round_draft.scatter(-1, token, 0.0), round_draft)
        return SelectionPlan(accept_probs=torch.stack(accepts, dim=-1), residual_probs=round_target)

    def tree_candidates(self, candidates: Tensor) -> Tensor:
        """The distinct tokens in order of first appearance: for i.i.d. drafts, each new one is
        q restricted to the tokens not yet seen, i.e. sampling without replacement."""
        seen: list[int] = []
        for token in candidates.tolist():
            if token not in seen:
                seen.append(token)
        return torch.tensor(seen, dtype=torch.long)

    def check_candidate_tuples(self, candidates: Tensor) -> None:
        super().check_candidate_tuples(candidates)
        repeats = (candidates[:, :, None] == candidates[:, None, :]).sum((-1, -2)) > candidates.shape[-1]
        if bool(repeats.any()):
            raise InvalidInputError("rule 'rsd' needs distinct candidates (drawn without replacement)")

    def acceptance_probability(self, target_probs: Tensor, draft_probs: Tensor, k: int) -> float | None:
        k = check_num_candidates(k)
        check_pair(target_probs, draft_probs, ndim=1)
        if k == 1 or int((draft_probs > 0).sum()) == 1:
            return float(torch.minimum(target_probs, draft_probs).sum())
        return None
