"""Block verification (Sun, Mendlovic, Leviathan, Aharoni, Ro, Beirami, Suresh, ICLR 2025, Algorithm 2).

Token-wise verification (the standard rule at every depth) judges each draft
token alone. Block verification judges the path jointly: it carries a weight
w_i = min(1, w_{i−1} · p_i(X_i) / q_i(X_i)) down the draft X_1..X_L (w_0 = 1)
and keeps the *longest* prefix that passes its test. With, at depth i < L,

    D_i(x) = max(0, w_i · p_{i+1}(x) − q_{i+1}(x)),   s_i = Σ_x D_i(x),
    h_i = s_i / (s_i + 1 − w_i),                      h_L = w_L,

(p_{i+1}, q_{i+1}: the target's and draft's laws after X_1..X_i) it draws
η_1..η_L uniformly, takes τ = the largest i with η_i ≤ h_i (0 if none),
emits X_1..X_τ and then one token from D_τ / s_τ — from p_{L+1} at τ = L, the
bonus token. With one draft token (L = 1) this is exactly the standard rule;
for longer paths it accepts at least as many tokens on average (the paper
proves it optimal among rules that see only the path's own probabilities).
A prefix rejected early can be rescued by a later η: the walk cannot stop at
the first rejection, so every row of the path is read.

Row conventions follow the tree (tree.py): target row r (r = 0 the root) is the
law after the path's first r tokens; draft rows 0..L−1 likewise (the leaf's row
is never used).

Worked example (the paper's §1): V = {a, b}, p = (1/3, 2/3), q = (2/3, 1/3) at
every context, L = 2: token-wise verification accepts 10/9 tokens a step on
average, block verification 11/9 (tests/rules/test_block.py).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from spectr.rules.base import normalize_or
from spectr.rules.standard import StandardRule


@dataclass(frozen=True)
class BlockPlan:
    """What block verification does with one draft path of L tokens."""

    stop_probs: Tensor  # [L + 1] h_0..h_L, with h_0 = 1: τ = 0 when no later index passes
    residual_probs: Tensor  # [L, V] law of the token emitted after X_1..X_τ for τ < L (τ = L: p_{L+1})

    def stop_law(self) -> Tensor:
        """P(τ = i) for i = 0..L: h_i times the chance that every later index fails. [L + 1]"""
        fails = torch.cat([(1 - self.stop_probs[1:]).flip(0).cumprod(0).flip(0), self.stop_probs.new_ones(1)])
        return self.stop_probs * fails  # fails[i] = ∏_{j > i} (1 − h_j)


def block_plan(target_probs: Tensor, draft_probs: Tensor, tokens: Tensor) -> BlockPlan:
    """Block verification's stop chances and residuals for a path of L tokens.

    target_probs, draft_probs [L, V]: the laws each path token was judged / drawn under (rows 0..L−1 of the
    tree); the leaf's target row is needed only when τ = L, so the caller reads it then.
    """
    length = tokens.shape[0]
    tokens = tokens.long()[:, None]
    p_token = target_probs.gather(-1, tokens)[:, 0]  # [L] p_i(X_i)
    q_token = draft_probs.gather(-1, tokens)[:, 0]  # [L] q_i(X_i)
    # A drawn token has q > 0; q = 0 only in a hand-built path, whose token then keeps the weight.
    ratio = torch.where(q_token > 0, p_token / q_token.clamp_min(torch.finfo(q_token.dtype).tiny),
                        torch.ones_like(p_token))
    weights = [target_probs.new_ones(())]  # w_0..w_L
    for i in range(length):
        weights.append(torch.clamp(weights[-1] * ratio[i], max=1.0))
    w = torch.stack(weights)  # [L + 1]
    # Row i of `excess` is D_i, built on the target and draft rows after X_1..X_i (rows i of the inputs).
    excess = (w[:length, None] * target_probs - draft_probs).clamp_min(0)  # [L, V]
    mass = excess.sum(-1)  # [L] s_0..s_{L−1}
    denominator = (mass + (1 - w[:length])).clamp_min(torch.finfo(mass.dtype).tiny)  # 1 − w first: exact
    # h_i = s_i / (s_i + 1 − w_i): 0 when s_i = 0 (p = q there, and the weight never dropped).
    inner = torch.where(mass > 0, (mass / denominator).clamp(max=1.0), torch.zeros_like(mass))
    stop = torch.cat([inner.new_ones(1), inner[1:], w[length:]])  # h_0 = 1, h_1..h_{L−1}, h_L = w_L
    return BlockPlan(stop_probs=stop, residual_probs=normalize_or(excess, target_probs))


def block_sample_stop(plan: BlockPlan, generator: torch.Generator | None) -> int:
    """Draw τ: the largest i with η_i ≤ h_i (h_0 = 1, so 0 when no other passes)."""
    uniforms = torch.rand(plan.stop_probs.shape, generator=generator, dtype=plan.stop_probs.dtype)
    return int((uniforms <= plan.stop_probs).nonzero()[:, 0].max())


class BlockRule(StandardRule):
    """Block verification. At the token level (one draft token) it is the standard rule; over a draft path
    the walk hands it the whole path (`path_level`)."""

    name = "block"
    path_level = True

    def path_plan(self, target_probs: Tensor, draft_probs: Tensor, tokens: Tensor) -> BlockPlan:
        """`block_plan` of one draft path: p, q [L, V] before each of its tokens [L]."""
        return block_plan(target_probs, draft_probs, tokens)
