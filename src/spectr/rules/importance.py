"""Two-step importance selection (after Khisti et al., ICLR 2025, "canonical decomposition").

Khisti et al. show that every multi-draft rule can be written in two steps:
(1) pick one of the k candidates, Y, by some selection whose token law s is
known; (2) run single-draft speculative sampling of Y against p: keep Y with
probability min(1, p(Y)/s(Y)), otherwise draw from r ∝ max(0, p − s). Step 2
makes the output exactly p for *any* step 1, and the acceptance is
Σ min(p, s), so the whole game is a step 1 whose s is close to p and can be
computed exactly. Their weighted-importance selections need s summed over
V^k tuples; this module's step 1 has s in closed form at any vocabulary.

Step 1 (an importance-ordered scan with thinning; our construction). Order
the vocabulary by the importance weight p/q, largest first (any order fixed
by (p, q) keeps the rule exact, so a coarse key is enough: s and the
candidates' ranks both come from that one sort). Each candidate X_i independently is *eligible* with
probability a(X_i) = min(1, (p/q)(X_i) / τ) (a = 1 for τ = 0). Y is the
eligible candidate that comes first in the order; when none is eligible, the
candidate that comes last. With, for token y, A_<y = Σ_{x before y} a(x)q(x)
and B_<y = Σ_{x before y} (1 − a(x))q(x), and W = 1 − A, the token law is
    s(y) = W_<y^k − W_≤y^k + B_≤y^k − B_<y^k:
P(no candidate is an eligible token before or at y) changes by the first
difference (Y = y is the first eligible one), and the second is the chance
that no candidate is eligible and the last one is y. Candidates are i.i.d.,
so each factor is one candidate's chance raised to the k-th power.

τ = 0 picks the candidate of largest weight, a vertex of the set of laws any
selection can have; its s exceeds p on the heaviest tokens once k is large,
and thinning (τ > 0) moves mass down the order. τ depends only on (p, q), so
picking per node the τ on a small grid with the largest Σ min(p, s) keeps the
rule exact. On the default target's chat contexts (T = 1) this reaches
0.9997 / 0.998 / 0.991 / 0.976 of the optimal α* for k = 2 / 3 / 4 / 6 where
K-SEQ reaches 0.974 / 0.964 / 0.959 / 0.954 (`spectr study rules`).

Worked example: p = [1, 0], q = [½, ½], k = 2, τ = 0: token 0 comes first and
is chosen whenever it is drawn, s = [¾, ¼], acceptance Σ min(p, s) = ¾ = α*.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spectr.rules.base import Rule, SelectionPlan, normalize_or, ratio_accept_probs
from spectr.rules.checks import check_num_candidates, check_pair

# The thresholds τ tried at every node. Measured on the default target's chat contexts (T = 1): the best τ
# is ~0 for k ≤ 3 and 1–2 for k = 4..6; a finer grid gains < 0.1 % of α* and costs a pass over V per value.
# At k = 2 the grid never beat τ = 0 there (0.9985 of α* either way), so two candidates skip it.
THINNING_GRID = (0.0, 1.0, 2.0)
GRID_FROM_K = 3


def _importance_order(target: Tensor, draft: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens by p/q, largest first (q = 0 first: never drawn, they add nothing).

    Returns order, rank [N, V] and the float32 ratios in that order [N, V]. The key is the top 16 bits of
    the float32 ratio (order-preserving for non-negative floats; ratios within ~1 % tie, and ties go by
    token id), sorted by numpy's radix sort: 0.4 ms at V = 49152 where a full float sort takes 2–5 ms.
    """
    target, draft = target.float(), draft.float()
    ratio = torch.where(draft > 0, target / draft.clamp_min(torch.finfo(draft.dtype).tiny), torch.inf)
    key = (0x7FFF - (ratio.view(torch.int32) >> 16)).to(torch.int16)  # descending ratio, >= 0
    order = torch.from_numpy(np.argsort(key.numpy(), axis=-1, kind="stable")).long()
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return order, rank, ratio.gather(-1, order)


def eligibility(ratio: Tensor, tau: Tensor) -> Tensor:
    """a = min(1, (p/q) / τ), 1 where τ = 0. ratio [N, V], τ [N] or [N, G] -> [N, V] or [N, G, V]."""
    tau = tau[..., None]
    if tau.dim() == 3:
        ratio = ratio[:, None]
    scaled = ratio / tau.clamp_min(torch.finfo(ratio.dtype).tiny)
    return torch.where(tau > 0, scaled.clamp(max=1.0), 1.0)


def _power(values: Tensor, k: int) -> Tensor:
    out = values
    for _ in range(k - 1):
        out = out * values
    return out


def sorted_selection_law(sorted_draft: Tensor, sorted_eligible: Tensor, k: int) -> Tensor:
    """s in importance order from q and a in that order ([N, V], or a [N, G, V]). Same shape as a.

    In-place arithmetic: at the full vocabulary this is ~10 passes over [G, V], the cost of the rule.
    """
    q = sorted_draft if sorted_eligible.dim() == 2 else sorted_draft[:, None]
    taken = sorted_eligible * q  # a·q
    passed = q - taken  # (1 − a)·q
    w_after = torch.cumsum(taken, -1).neg_().add_(1).clamp_(min=0)  # W_≤y
    b_after = torch.cumsum(passed, -1)  # B_≤y
    law = _power((w_after + taken).clamp_(max=1.0), k)  # W_<y^k
    law -= _power(w_after, k)
    law += _power(b_after, k)
    law -= _power((b_after - passed).clamp_(min=0), k)
    return law.clamp_(min=0)


def selection_law(draft: Tensor, ratio_order: tuple[Tensor, Tensor], tau: Tensor, k: int) -> Tensor:
    """s, the law of step 1's pick in token order, for q [N, V], (order, sorted ratio) and τ [N]."""
    order, sorted_ratio = ratio_order
    law = sorted_selection_law(draft.gather(-1, order), eligibility(sorted_ratio, tau.float()).to(draft.dtype), k)
    return torch.empty_like(law).scatter_(-1, order, law)


def best_thresholds(target: Tensor, draft: Tensor, order: Tensor, sorted_ratio: Tensor, k: int,
                    thresholds=THINNING_GRID) -> tuple[Tensor, Tensor]:
    """Per node, the τ of `thresholds` with the largest Σ min(p, s), p, q [N, V]; returns τ [N] and its s
    in importance order, both in float32 (decoding's dtype: there that s is the one used)."""
    grid = torch.tensor(thresholds).expand(target.shape[0], -1)  # [N, G]
    laws = sorted_selection_law(draft.gather(-1, order).float(), eligibility(sorted_ratio, grid), k)  # [N, G, V]
    acceptance = torch.minimum(target.gather(-1, order).float()[:, None], laws).sum(-1)  # [N, G]
    best = acceptance.argmax(-1)
    rows = torch.arange(target.shape[0])
    return grid[rows, best], laws[rows, best]


@dataclass(frozen=True)
class StepOne:
    """Step 1 at N nodes: the τ chosen, the importance order and the law of the pick."""

    tau: Tensor  # [N] float32
    rank: Tensor  # [N, V] each token's place in the importance order
    sorted_ratio: Tensor  # [N, V] p/q in that order (float32)
    law: Tensor  # [N, V] s in token order

    def of_candidates(self, candidates: Tensor) -> tuple[Tensor, Tensor]:
        """The candidates' a and ranks, [N, k] each."""
        rank = self.rank.gather(-1, candidates)
        return eligibility(self.sorted_ratio.gather(-1, rank), self.tau).to(self.law.dtype), rank


def pick_chances(eligible: Tensor, rank: Tensor) -> Tensor:
    """Step 1's chance to pick each candidate, from the candidates' a and ranks [N, k]. Returns [N, k].

    In order of rank, candidate j is picked when it is eligible and none before it is; the last one
    also when none is eligible. Equal tokens have equal ranks and the same a, so their order is moot.
    """
    position = torch.argsort(rank, dim=-1, stable=True)
    a = eligible.gather(-1, position)
    none_before = torch.cumprod(torch.cat([torch.ones_like(a[:, :1]), 1 - a[:, :-1]], -1), -1)
    chance = a * none_before
    chance[:, -1] += none_before[:, -1] * (1 - a[:, -1])
    return torch.empty_like(chance).scatter_(-1, position, chance)


def sequential_accepts(take: Tensor) -> Tensor:
    """The per-candidate accept chances of a sequential plan whose candidate i is taken with chance take_i."""
    before = torch.cumsum(take, -1) - take
    left = 1 - before
    return torch.where(left > 0, take / left.clamp_min(torch.finfo(take.dtype).tiny), 1.0).clamp(0.0, 1.0)


class ImportanceRule(Rule):
    name = "importance"

    def __init__(self, thresholds: tuple[float, ...] = THINNING_GRID):
        self.thresholds = thresholds

    def step_one(self, target: Tensor, draft: Tensor, k: int) -> StepOne:
        """τ per node and the law s of the pick, in the dtype of p and q [N, V]."""
        order, rank, sorted_ratio = _importance_order(target, draft)
        if len(self.thresholds) == 1 or k < GRID_FROM_K:
            tau, law = torch.full(target.shape[:1], float(self.thresholds[0])), None
        else:
            tau, law = best_thresholds(target, draft, order, sorted_ratio, k, self.thresholds)
        if law is None or law.dtype != draft.dtype:  # float64 (tests, studies): s again at that precision
            law = sorted_selection_law(draft.gather(-1, order), eligibility(sorted_ratio, tau).to(draft.dtype), k)
        return StepOne(tau, rank, sorted_ratio, torch.empty_like(law).scatter_(-1, order, law))

    def plan(self, target_probs: Tensor, draft_probs: Tensor, candidates: Tensor) -> SelectionPlan:
        target, draft = target_probs, draft_probs
        step = self.step_one(target, draft, candidates.shape[-1])
        pick = pick_chances(*step.of_candidates(candidates))
        keep = ratio_accept_probs(target.gather(-1, candidates), step.law.gather(-1, candidates))
        residual = normalize_or((target - step.law).clamp_min(0), target)
        return SelectionPlan(accept_probs=sequential_accepts(pick * keep), residual_probs=residual)

    def selection_law(self, target_probs: Tensor, draft_probs: Tensor, k: int) -> Tensor:
        """s for one node, p, q [V]: the law of step 1's pick (tests, studies)."""
        k = check_num_candidates(k)
        check_pair(target_probs, draft_probs, ndim=1)
        return self.step_one(target_probs[None], draft_probs[None], k).law[0]

    def acceptance_probability(self, target_probs: Tensor, draft_probs: Tensor, k: int) -> float:
        law = self.selection_law(target_probs, draft_probs, k)
        return float(torch.minimum(target_probs, law).sum())
