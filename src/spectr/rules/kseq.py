"""K-SEQ, SpecTr's k-sequential selection (Sun et al. 2023, Algorithm 2; SPECTR.md §1.2).

With a parameter ρ ∈ [1, k] and the per-trial acceptance chance
    β(ρ) = Σ_x min(q(x), p(x)/ρ),
candidate X_i (i = 1..k, i.i.d. from q) is accepted with probability
min(1, p(X_i) / (ρ·q(X_i))), stopping at the first acceptance. If all are
rejected the token is drawn from
    r(x) ∝ p(x) − c·min(q(x), p(x)/ρ),   c = (1 − (1 − β)^k) / β = Σ_{j<k} (1 − β)^j.
Each emitted token then has law c·min(q, p/ρ) + (1 − β)^k·r = p: exact for any
ρ with c ≤ ρ (so that r ≥ 0). The acceptance 1 − (1 − β(ρ))^k falls as ρ grows,
so the best ρ is ρ*, the smallest ρ with ρ·β(ρ) ≥ 1 − (1 − β(ρ))^k. The gap
ρβ(ρ) − (1 − (1 − β(ρ))^k) is non-decreasing in ρ and ≥ 0 at ρ = k, so
bisection finds ρ*; it returns the upper (valid) end and the residual is
always built with the general formula from the ρ actually used, which keeps
the rule exact at any search precision.

Worked example: p = [1, 0], q = [½, ½], k = 2 → β = ½ on [1, 2], ρ* = 1.5,
acceptance = 1 − ¼ = 0.75 = α*.
"""

import math

import numpy as np
import torch
from torch import Tensor

from spectr.rules.base import Rule, SelectionPlan, normalize_or, ratio_accept_probs
from spectr.rules.checks import check_num_candidates, check_pair

RHO_TOLERANCE = 1e-6  # the search stops when the bracket around ρ* is this narrow


def kseq_trial_acceptance(target_probs: Tensor, draft_probs: Tensor, rho: Tensor) -> Tensor:
    """β(ρ) = Σ min(q, p/ρ) for p, q [N, V] and ρ [N]. Returns [N]."""
    return torch.minimum(draft_probs, target_probs / rho[:, None]).sum(-1)


def kseq_acceptance(beta: Tensor, k: Tensor) -> Tensor:
    """1 − (1 − β)^k, computed without cancellation for small β. β, k [N] -> [N]."""
    return -torch.expm1(k * torch.log1p(-beta))


def kseq_rho_star(
    target_probs: Tensor, draft_probs: Tensor, k: Tensor | int, tolerance: float = RHO_TOLERANCE
) -> Tensor:
    """The smallest valid ρ ∈ [1, k] per node, by bisection. p, q [N, V]; k int or [N]. Returns ρ [N].

    The bisection keeps its upper end valid and returns it, so the result is never below ρ* and
    c ≤ ρ holds. Each node is searched on its own (its ρ does not depend on the rest of the batch),
    in float64 over the tokens where both laws are positive (β sums nothing elsewhere; a draft over a
    reduced vocabulary, or top-k / top-p, leaves most of the vocabulary at zero) with numpy: ~20
    trials of a few vector operations each, where torch's per-operation dispatch cost 2 ms a node.
    """
    num_nodes = target_probs.shape[0]
    ks = torch.as_tensor(k, dtype=torch.float64).expand(num_nodes).tolist()
    p_all, q_all = target_probs.detach().cpu().numpy(), draft_probs.detach().cpu().numpy()
    rho = []
    for n in range(num_nodes):
        both = (p_all[n] > 0) & (q_all[n] > 0)
        rho.append(_rho_star_of_node(p_all[n][both].astype(np.float64), q_all[n][both].astype(np.float64),
                                     ks[n], tolerance))
    return torch.tensor(rho, dtype=target_probs.dtype)


def _rho_star_of_node(p: np.ndarray, q: np.ndarray, k: float, tolerance: float) -> float:
    # Once ρ is bracketed in [low, high], a token with ratio p/q ≥ high adds q to β(ρ) and one with
    # ratio ≤ low adds p/ρ, whatever ρ in the bracket: those are summed once and only the tokens whose
    # ratio lies inside the bracket are kept for the next trials.
    ratio = p / q
    fixed_q = fixed_p = 0.0

    def valid(rho: float) -> bool:  # ρβ(ρ) ≥ 1 − (1 − β(ρ))^k
        beta = fixed_q + fixed_p / rho + float(np.minimum(q, p / rho).sum())
        acceptance = 1.0 if beta >= 1.0 else -math.expm1(k * math.log1p(-beta))
        return rho * beta >= acceptance

    low, high = 1.0, 1.0 if valid(1.0) else k  # ρ = 1 valid (k = 1, p = q) needs no search
    trials = 0
    while high - low > tolerance:
        mid = (low + high) / 2
        if valid(mid):
            high = mid
        else:
            low = mid
        trials += 1
        if trials % 3 == 0 and ratio.size > 64:
            above, below = ratio >= high, ratio <= low
            fixed_q += float(q[above].sum())
            fixed_p += float(p[below].sum())
            inside = ~(above | below)
            p, q, ratio = p[inside], q[inside], ratio[inside]
    return high


def kseq_plan(
    target_probs: Tensor, draft_probs: Tensor, candidates: Tensor, rho: Tensor
) -> SelectionPlan:
    """K-SEQ's accept chances and residual at a given ρ [N]. p, q [N, V], candidates [N, k]."""
    k = torch.full_like(rho, candidates.shape[-1])
    capped = torch.minimum(draft_probs, target_probs / rho[:, None])  # [N, V] min(q, p/ρ)
    beta = capped.sum(-1)  # [N]
    # c = (1 − (1 − β)^k) / β, whose limit at β = 0 is k.
    c = torch.where(beta > 0, kseq_acceptance(beta, k) / beta.clamp_min(torch.finfo(beta.dtype).tiny), k)
    residual = normalize_or((target_probs - c[:, None] * capped).clamp_min(0), target_probs)
    accept = ratio_accept_probs(
        target_probs.gather(-1, candidates), rho[:, None] * draft_probs.gather(-1, candidates)
    )
    return SelectionPlan(accept_probs=accept, residual_probs=residual)


class KSeqRule(Rule):
    name = "kseq"

    def __init__(self, tolerance: float = RHO_TOLERANCE):
        self.tolerance = tolerance

    def plan(self, target_probs: Tensor, draft_probs: Tensor, candidates: Tensor) -> SelectionPlan:
        rho = kseq_rho_star(target_probs, draft_probs, candidates.shape[-1], self.tolerance)
        return kseq_plan(target_probs, draft_probs, candidates, rho)

    def rho_star(self, target_probs: Tensor, draft_probs: Tensor, k: int) -> float:
        """ρ* for one node: p, q [V]."""
        k = check_num_candidates(k)
        check_pair(target_probs, draft_probs, ndim=1)
        return float(kseq_rho_star(target_probs[None], draft_probs[None], k, self.tolerance)[0])

    def acceptance_probability(self, target_probs: Tensor, draft_probs: Tensor, k: int) -> float:
        rho = torch.tensor([self.rho_star(target_probs, draft_probs, k)], dtype=target_probs.dtype)
        beta = kseq_trial_acceptance(target_probs[None], draft_probs[None], rho)
        return float(kseq_acceptance(beta, torch.full_like(beta, k))[0])
