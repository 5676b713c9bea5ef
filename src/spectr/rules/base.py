"""The shape every token-level selection rule shares.

Glossary (SpecTr, Sun et al. 2023, §3; SPECTR.md §1):
- target_probs p [V]: the target's next-token distribution after processing.
- draft_probs q [V]: the draft's, processed the same way.
- candidates X_1..X_k: tokens proposed by the draft (i.i.d. from q unless the
  rule draws them otherwise).
- accepted: the emitted token is one of the candidates, taken by the rule.
- residual: the distribution sampled from when every candidate is rejected.

All the rules here are *sequential*: candidate i is accepted with some
probability a_i once 1..i-1 were rejected, and if all are rejected a token is
drawn from a residual. A rule is therefore fully described, for one tuple of
candidates, by a `SelectionPlan` (a_1..a_k and the residual). Sampling and the
exact output law are both derived from the plan, so the analytic exactness
tests check the very numbers the sampler uses.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
import itertools

import torch
from torch import Tensor

from spectr.sampling import sample_categorical
from spectr.rules.checks import check_candidates, check_draft, check_num_candidates, check_pair


@dataclass(frozen=True)
class SelectionPlan:
    """What a rule does with one tuple of candidates, for a batch of N nodes."""

    accept_probs: Tensor  # [N, k] chance to take candidate i once 1..i-1 were rejected
    residual_probs: Tensor  # [N, V] law of the emitted token when all k are rejected


def normalize_or(probs: Tensor, fallback: Tensor) -> Tensor:
    """probs / probs.sum(-1), rows with no mass replaced by `fallback` rows. [N, V]

    A residual has no mass only when the acceptance probability is 1, so the
    fallback is never sampled; it keeps the plan finite.
    """
    mass = probs.sum(-1, keepdim=True)
    return torch.where(mass > 0, probs / mass.clamp_min(torch.finfo(probs.dtype).tiny), fallback)


def ratio_accept_probs(numerator: Tensor, denominator: Tensor) -> Tensor:
    """min(1, numerator / denominator), elementwise, with 0/0 = 0 and x/0 = 1."""
    safe = denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
    ratio = torch.where(denominator > 0, numerator / safe, (numerator > 0).to(numerator.dtype))
    return ratio.clamp(max=1.0)


def sample_from_plan(
    plan: SelectionPlan, candidates: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Run the sequential accept/reject of `plan`. Returns tokens [N] and accepted [N]."""
    accept_probs = plan.accept_probs  # [N, k]
    uniforms = torch.rand(accept_probs.shape, generator=generator, dtype=accept_probs.dtype)
    hits = uniforms < accept_probs  # [N, k]
    accepted = hits.any(-1)  # [N]
    first_hit = hits.to(torch.int8).argmax(-1)  # [N] index of the first True (0 when none)
    tokens = candidates.long().gather(-1, first_hit[:, None]).squeeze(-1)  # [N]
    rejected = ~accepted
    if bool(rejected.any()):
        residual = plan.residual_probs[rejected]  # [R, V]
        tokens[rejected] = sample_categorical(residual, generator)[:, 0]
    return tokens, accepted


def law_of_plan(plan: SelectionPlan, candidates: Tensor) -> tuple[Tensor, Tensor]:
    """Exact law of the emitted token under `plan`. Returns law [N, V], acceptance [N]."""
    accept_probs = plan.accept_probs  # [N, k]
    survive = torch.cumprod(1 - accept_probs, dim=-1)  # [N, k] all of 1..i rejected
    reach = torch.cat([torch.ones_like(survive[:, :1]), survive[:, :-1]], dim=-1)  # [N, k]
    take = reach * accept_probs  # [N, k] chance that candidate i is the one taken
    law = (survive[:, -1:] * plan.residual_probs).scatter_add(-1, candidates.long(), take)
    return law, take.sum(-1)


class Rule(ABC):
    """A token-level selection rule: k draft candidates in, one target-distributed token out."""

    name: str
    max_candidates: int | None = None  # most candidates (drafts) the rule takes; None: any number
    path_level = False  # True: the walk hands it a whole single draft path (block verification)

    @abstractmethod
    def plan(self, target_probs: Tensor, draft_probs: Tensor, candidates: Tensor) -> SelectionPlan:
        """The accept chances and residual for candidates [N, k] under p, q [N, V]. Unchecked."""

    @abstractmethod
    def acceptance_probability(self, target_probs: Tensor, draft_probs: Tensor, k: int) -> float | None:
        """Exact chance that one of k candidates is taken (None where no closed form exists)."""

    def check_k(self, k: int) -> int:
        return check_num_candidates(k)

    def tree_candidates(self, candidates: Tensor) -> Tensor:
        """The candidates to use at a tree node, from the next tokens [k'] of the drafts through it."""
        return candidates

    def check_candidate_tuples(self, candidates: Tensor) -> None:
        """Raise if candidates [N, k] could not come from this rule's draw (beyond range checks)."""
        self.check_k(candidates.shape[-1])

    # --- candidates -------------------------------------------------------

    def draw_candidates(self, draft_probs: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """k candidates i.i.d. from draft_probs [V]. Returns LongTensor [k]."""
        check_draft(draft_probs, ndim=1)
        return self.draw_candidates_batch(draft_probs[None], k, generator)[0]

    def draw_candidates_batch(
        self, draft_probs: Tensor, k: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """k candidates per row of draft_probs [N, V]. Returns LongTensor [N, k]."""
        k = self.check_k(k)
        check_draft(draft_probs, ndim=2)
        return sample_categorical(draft_probs, generator, num_samples=k)

    def candidate_law(self, draft_probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Every candidate tuple `draw_candidates` can return, with its probability.

        Returns tuples [M, k] and weights [M] (small V only: M = |supp q|^k).
        """
        k = self.check_k(k)
        support = torch.nonzero(draft_probs > 0).squeeze(-1).tolist()
        tuples = torch.tensor(list(itertools.product(support, repeat=k)), dtype=torch.long)
        weights = draft_probs[tuples].prod(-1)
        return tuples.reshape(-1, k), weights

    # --- selection --------------------------------------------------------

    def select(
        self,
        target_probs: Tensor,
        draft_probs: Tensor,
        candidates: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[int, bool]:
        """Choose one token given target p [V], draft q [V] and candidates [k].

        Returns (token, accepted); accepted is False when the token came from the residual.
        """
        check_pair(target_probs, draft_probs, ndim=1)
        check_candidates(candidates, draft_probs)
        self.check_candidate_tuples(candidates[None])
        tokens, accepted = self.select_unchecked(
            target_probs[None], draft_probs[None], candidates.long()[None], generator
        )
        return int(tokens[0]), bool(accepted[0])

    def select_batch(
        self,
        target_probs: Tensor,
        draft_probs: Tensor,
        candidates: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """`select` for N independent nodes: p, q [N, V], candidates [N, k] -> tokens [N], accepted [N]."""
        check_pair(target_probs, draft_probs, ndim=2)
        check_candidates(candidates, draft_probs)
        self.check_candidate_tuples(candidates)
        return self.select_unchecked(target_probs, draft_probs, candidates.long(), generator)

    def select_unchecked(
        self,
        target_probs: Tensor,
        draft_probs: Tensor,
        candidates: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """`select_batch` without the input checks, for callers that built p, q and candidates themselves."""
        return sample_from_plan(self.plan(target_probs, draft_probs, candidates), candidates, generator)

    def output_law(self, target_probs: Tensor, draft_probs: Tensor, candidates: Tensor) -> tuple[Tensor, float]:
        """Exact law of `select`'s token for fixed candidates [k]: (law [V], acceptance chance)."""
        check_pair(target_probs, draft_probs, ndim=1)
        check_candidates(candidates, draft_probs)
        law, accept = self.output_law_batch(target_probs[None], draft_probs[None], candidates[None])
        return law[0], float(accept[0])

    def output_law_batch(self, target_probs: Tensor, draft_probs: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
        """Exact law for N nodes: p, q [N, V], candidates [N, k] -> law [N, V], acceptance [N]."""
        check_pair(target_probs, draft_probs, ndim=2)
        check_candidates(candidates, draft_probs)
        self.check_candidate_tuples(candidates)
        return law_of_plan(self.plan(target_probs, draft_probs, candidates.long()), candidates)

    def __repr__(self) -> str:
        return f"<rule {self.name}>"
