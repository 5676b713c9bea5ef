"""The optimal transport plan: the best acceptance any valid k-candidate rule can reach.

For k i.i.d. candidates X_1..X_k ~ q and a token Y that must have law p, the
largest possible P(Y ∈ {X_1..X_k}) over all couplings is (SpecTr, Theorem 2)
    α*(p, q, k) = min over subsets Ω ⊆ V of  p(Ω) + 1 − q(Ω)^k.

The minimum is always reached by a set of the tokens with the smallest p/q
(`optimal_acceptance`, exact at any vocabulary in O(V log V)). Why: relax
membership to θ ∈ [0, 1]^V. For a fixed draft mass s = Σ θ q the smallest
Σ θ p fills tokens by ascending p/q (a fractional knapsack), a convex
piecewise-linear G(s) whose breakpoints are those prefixes; G(s) − s^k is
concave on each piece, so its minimum over s sits at a breakpoint — a prefix,
which is an integral set, so the relaxation's minimum is α*'s.
`optimal_acceptance_by_subsets` checks that by brute force over the 2^|V|
subsets (tests); `optimal_transport_plan` solves the coupling linear program
itself (|V|^k candidate tuples × |V| outputs) with HiGHS. Those two are test
oracles for tiny vocabularies, not decoding paths.
"""

from dataclasses import dataclass
import itertools

import numpy as np
import scipy.optimize
import scipy.sparse
import torch
from torch import Tensor

from spectr.errors import InvalidInputError
from spectr.rules.checks import check_num_candidates, check_pair

MAX_SUBSET_VOCAB = 20  # 2^20 subsets
MAX_PLAN_VARIABLES = 200_000


def optimal_acceptance(target_probs: Tensor, draft_probs: Tensor, k: int) -> float:
    """α*(p, q, k), exactly, over the prefixes of the tokens sorted by p/q (module docstring). p, q [V]."""
    k = check_num_candidates(k)
    check_pair(target_probs, draft_probs, ndim=1)
    target, draft = target_probs.double(), draft_probs.double()
    # p/q, with q = 0 last (such a token adds p and no draft mass: never in a minimising set).
    ratio = torch.where(draft > 0, target / draft.clamp_min(torch.finfo(torch.float64).tiny), torch.inf)
    order = ratio.argsort()
    p_mass = torch.cumsum(target[order], 0)
    q_mass = torch.cumsum(draft[order], 0).clamp(max=1.0)
    return float(torch.clamp((p_mass + 1 - q_mass**k).min(), max=1.0))  # the empty set gives 1


def optimal_acceptance_by_subsets(target_probs: Tensor, draft_probs: Tensor, k: int) -> float:
    """α*(p, q, k) by brute force over every subset: the oracle for `optimal_acceptance`. V ≤ 20."""
    k = check_num_candidates(k)
    check_pair(target_probs, draft_probs, ndim=1)
    vocab = target_probs.shape[-1]
    if vocab > MAX_SUBSET_VOCAB:
        raise InvalidInputError(
            f"optimal_acceptance enumerates 2^V subsets; V = {vocab} exceeds the limit of {MAX_SUBSET_VOCAB}"
        )
    target = target_probs.double().numpy()
    draft = draft_probs.double().numpy()
    subsets = (np.arange(2**vocab)[:, None] >> np.arange(vocab)) & 1  # [2^V, V] membership
    return float((subsets @ target + 1 - (subsets @ draft) ** k).min())


@dataclass(frozen=True)
class TransportPlan:
    """An optimal coupling of k i.i.d. draft candidates with a target-distributed token."""

    acceptance: float  # P(Y ∈ candidates) under the plan, = α*
    tuples: Tensor  # [M, k] every candidate tuple over the draft's support
    coupling: Tensor  # [M, V] joint probability of (tuple, emitted token)


def optimal_transport_plan(target_probs: Tensor, draft_probs: Tensor, k: int) -> TransportPlan:
    """Solve the coupling LP: maximise P(Y ∈ X) s.t. X ~ q^⊗k, Y ~ p (scipy HiGHS)."""
    k = check_num_candidates(k)
    check_pair(target_probs, draft_probs, ndim=1)
    target = target_probs.double().numpy()
    draft = draft_probs.double().numpy()
    vocab = target.shape[0]
    support = np.flatnonzero(draft > 0)
    num_tuples = support.size**k
    if num_tuples * vocab > MAX_PLAN_VARIABLES:
        raise InvalidInputError(
            f"the transport LP has |supp q|^k × V = {num_tuples * vocab} variables; "
            f"limit {MAX_PLAN_VARIABLES} (use optimal_acceptance for the value)"
        )
    tuples = np.array(list(itertools.product(support, repeat=k)), dtype=np.int64).reshape(-1, k)
    tuple_probs = draft[tuples].prod(-1)  # [M]
    hits = (tuples[:, :, None] == np.arange(vocab)).any(1)  # [M, V] output token is a candidate
    # Variable (m, y) at index m * V + y. Row sums: tuple marginals; column sums: target marginals.
    variables = np.arange(num_tuples * vocab)
    rows = scipy.sparse.csr_matrix(
        (np.ones(variables.size), (variables // vocab, variables)), shape=(num_tuples, variables.size)
    )
    cols = scipy.sparse.csr_matrix(
        (np.ones(variables.size), (variables % vocab, variables)), shape=(vocab, variables.size)
    )
    # One marginal constraint is implied by the others (both sides sum to 1); keeping it lets
    # float round-off make the system inconsistent, so the last target column is dropped.
    result = scipy.optimize.linprog(
        c=-hits.ravel().astype(float),
        A_eq=scipy.sparse.vstack([rows, cols[:-1]]),
        b_eq=np.concatenate([tuple_probs, target[:-1]]),
        bounds=(0, None),
        method="highs",
    )
    if result.status != 0:
        raise RuntimeError(f"the transport LP did not solve: {result.message}")
    coupling = np.clip(result.x.reshape(num_tuples, vocab), 0, None)
    return TransportPlan(
        acceptance=float(-result.fun),
        tuples=torch.from_numpy(tuples),
        coupling=torch.from_numpy(coupling),
    )
