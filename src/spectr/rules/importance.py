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
and thinning (τ > 0) moves mass down the order. Where p ≈ q the best step 1
is no scan at all but the first candidate (s = q), so with chance λ step 1
takes it outright: s = λq + (1 − λ)·s_scan. τ and λ depend only on (p, q), so
picking per node the pair on a small grid with the largest Σ min(p, s) keeps
the rule exact. On the default target's chat contexts (T = 1) this reaches
0.999 / 0.995 / 0.989 / 0.973 of the optimal α* for k = 2 / 3 / 4 / 6 where
K-SEQ reaches 0.975 / 0.967 / 0.961 / 0.956 (`spectr study rules`); at k = 8
the two are about even (0.96). On random pairs over small vocabularies it is
the worse of the two (0.943 of α* against 0.967, same study).

Worked example: p = [1, 0], q = [½, ½], k = 2, τ = 0: token 0 comes first and
is chosen whenever it is drawn, s = [¾, ¼], acceptance Σ min(p, s) = ¾ = α*.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spectr.rules.base import Rule, SelectionPlan, normalize_or, ratio_accept_probs
from spectr.rules.checks import check_num_candidates, check_pair

# The thresholds tried at every node, as τ / k. Measured on the default target's chat contexts (T = 1), as a
# fraction of α*: the best single τ is ~0 for k ≤ 3, ~k/4 for k = 4..6 and ~k/3 for k = 8; this grid reaches
# 0.993 / 0.987 / 0.972 / 0.960 for k = 3 / 4 / 6 / 8 where the best τ per node would reach 0.994 / 0.988 /
# 0.973 / 0.963. Each value costs a pass over V. At k = 2 the grid never beat τ = 0 there (0.9985 of α*
# either way), so two candidates skip it.
THINNING_GRID = (0.0, 0.25, 0.5)
# λ: with this chance step 1 takes the first candidate outright (law q), else it scans. Where p ≈ q the scan
# alone is poor (its s leans to the heavy-weight tokens; at p = q only λ = 1 reaches α* = 1): on random
# small-vocabulary pairs the rule fell below K-SEQ in 41 of 72 cells of `spectr study rules` without it, and
# still does in 35 (mean 0.943 of α* vs K-SEQ's 0.967): its strength is the long-tailed laws of a real model.
MIXTURE_GRID = (0.0, 0.5, 1.0)
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


def best_step(target: Tensor, draft: Tensor, order: Tensor, sorted_ratio: Tensor, k: int,
              thresholds=THINNING_GRID, mixtures=MIXTURE_GRID) -> tuple[Tensor, Tensor, Tensor]:
    """Per node, the τ of k·`thresholds` and λ of `mixtures` with the largest Σ min(p, s), p, q [N, V].

    Returns τ [N], λ [N] and that s in importance order, all float32 (decoding's dtype: there this s is
    the one used; the choice only has to be a function of (p, q)).
    """
    rows = torch.arange(target.shape[0])
    taus = (k * torch.tensor(thresholds if k >= GRID_FROM_K else thresholds[:1])).expand(target.shape[0], -1)
    q = draft.gather(-1, order).float()
    scans = sorted_selection_law(q, eligibility(sorted_ratio, taus), k)  # [N, G, V]
    p = target.gather(-1, order).float()[:, None, None]
    lam = torch.tensor(mixtures)[None, None, :, None]  # [1, 1, M, 1]
    laws = lam * q[:, None, None] + (1 - lam) * scans[:, :, None]  # [N, G, M, V]
    acceptance = torch.minimum(p, laws).sum(-1).flatten(1)  # [N, G·M]
    best = acceptance.argmax(-1)
    tau_index, mix_index = best // len(mixtures), best % len(mixtures)
    return taus[rows, tau_index], torch.tensor(mixtures)[mix_index], laws[rows, tau_index, mix_index]


@dataclass(frozen=True)
class StepOne:
    """Step 1 at N nodes: the τ and λ chosen, the importance order and the law of the pick."""

    tau: Tensor  # [N] float32
    mix: Tensor  # [N] float32, λ: the chance that step 1 takes the first candidate outright
    rank: Tensor  # [N, V] each token's place in the importance order
    sorted_ratio: Tensor  # [N, V] p/q in that order (float32)
    law: Tensor  # [N, V] s in token order

    def pick_chances(self, candidates: Tensor) -> Tensor:
        """Step 1's chance to pick each of the candidates [N, k]. Returns [N, k]."""
        rank = self.rank.gather(-1, candidates)
        eligible = eligibility(self.sorted_ratio.gather(-1, rank), self.tau).to(self.law.dtype)
        chance = (1 - self.mix.to(self.law.dtype))[:, None] * pick_chances(eligible, rank)
        chance[:, 0] += self.mix.to(self.law.dtype)
        return chance


def pick_chances(eligible: Tensor, rank: Tensor) -> Tensor:
    """The scan's chance to pick each candidate, from the candidates' a and ranks [N, k]. Returns [N, k].

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

    def __init__(self, thresholds: tuple[float, ...] = THINNING_GRID,
                 mixtures: tuple[float, ...] = MIXTURE_GRID):
        self.thresholds = thresholds  # τ / k
        self.mixtures = mixtures  # λ

    def step_one(self, target: Tensor, draft: Tensor, k: int) -> StepOne:
        """τ and λ per node and the law s of the pick, in the dtype of p and q [N, V]."""
        order, rank, sorted_ratio = _importance_order(target, draft)
        tau, mix, law = best_step(target, draft, order, sorted_ratio, k, self.thresholds, self.mixtures)
        if law.dtype != draft.dtype:  # float64 (tests, studies): s again at that precision
            q = draft.gather(-1, order)
            scan = sorted_selection_law(q, eligibility(sorted_ratio, tau).to(draft.dtype), k)
            lam = mix.to(draft.dtype)[:, None]
            law = lam * q + (1 - lam) * scan
        return StepOne(tau, mix, rank, sorted_ratio, torch.empty_like(law).scatter_(-1, order, law))

    def plan(self, target_probs: Tensor, draft_probs: Tensor, candidates: Tensor) -> SelectionPlan:
        target = target_probs
        step = self.step_one(target, draft_probs, candidates.shape[-1])
        keep = ratio_accept_probs(target.gather(-1, candidates), step.law.gather(-1, candidates))
        residual = normalize_or((target - step.law).clamp_min(0), target)
        return SelectionPlan(accept_probs=sequential_accepts(step.pick_chances(candidates) * keep),
                             residual_probs=residual)

    def selection_law(self, target_probs: Tensor, draft_probs: Tensor, k: int) -> Tensor:
        """s for one node, p, q [V]: the law of step 1's pick (tests, studies)."""
        k = check_num_candidates(k)
        check_pair(target_probs, draft_probs, ndim=1)
        return self.step_one(target_probs[None], draft_probs[None], k).law[0]

    def acceptance_probability(self, target_probs: Tensor, draft_probs: Tensor, k: int) -> float:
        law = self.selection_law(target_probs, draft_probs, k)
        return float(torch.minimum(target_probs, law).sum())
