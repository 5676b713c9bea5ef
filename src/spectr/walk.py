"""Selection over a draft tree (SPECTR.md §2, step 3): walk down from the root, one rule call per level.

At a context (the root, or an accepted node) the drafts still consistent with
the accepted prefix propose their next tokens, i.i.d. from q(·|context); the
token-level rule picks one token from them (K-SEQ with k' = their count). If
that token is a child in the tree — accepted, or a residual draw that happens
to match — the walk moves there; otherwise the step ends with it. At a leaf
the walk ends with a bonus token sampled from p at the leaf.

A path-level rule (block verification, rules/block.py) judges a single draft
path as a whole: it reads p along the path, keeps a prefix and draws the next
token from its own residual; the step ends there.

For a tree of deterministic proposals (`draft_probs` is None, e.g. n-gram
lookups) the exact and optimal choice is to sample from p and follow the tree
when the token is there.

`walk` samples; `walk_law` computes the exact law of what `walk` emits, by the
same navigation, for the exactness tests.
"""

import torch
from torch import Tensor

from spectr.errors import InvalidInputError
from spectr.rules import Rule
from spectr.rules.base import law_of_plan
from spectr.rules.block import block_sample_stop
from spectr.sampling import sample_categorical
from spectr.tree import DraftTree


def _choice_inputs(tree: DraftTree, context: int, rule: Rule) -> Tensor | None:
    """The candidates the rule sees at `context`, or None at a leaf / for deterministic trees."""
    if tree.draft_probs is None:
        return None
    candidates = tree.candidates(context)
    return rule.tree_candidates(candidates) if candidates.numel() else None


def judges_path(tree: DraftTree, rule: Rule) -> bool:
    """Whether the walk hands this tree to a path-level rule whole (block verification of one draft path)."""
    if not getattr(rule, "path_level", False) or tree.draft_probs is None or tree.num_nodes == 0:
        return False
    if tree.paths.shape[0] != 1:
        raise InvalidInputError(f"rule '{rule.name}' judges one draft path; this tree has {tree.paths.shape[0]}")
    return True


def _path_inputs(tree: DraftTree, target_probs: Tensor, rule: Rule):
    nodes = tree.paths[0]  # a single path: nodes in depth order
    length = nodes.shape[0]
    rows = torch.cat([target_probs[row : row + 1] for row in range(length)])  # p before each path token
    return nodes, rule.path_plan(rows, tree.draft_probs[:length], tree.tokens[nodes])


def _walk_path(tree: DraftTree, target_probs: Tensor, rule: Rule, generator: torch.Generator | None):
    nodes, plan = _path_inputs(tree, target_probs, rule)
    length = nodes.shape[0]
    tau = block_sample_stop(plan, generator)
    residual = plan.residual_probs[tau : tau + 1] if tau < length else target_probs[length : length + 1]
    token = int(sample_categorical(residual, generator)[0, 0])
    path = nodes[:tau].tolist()
    return tree.tokens[nodes[:tau]].tolist() + [token], path, [1] * min(tau + 1, length)


def _path_law(tree: DraftTree, target_probs: Tensor, rule: Rule) -> dict[tuple[int, ...], float]:
    nodes, plan = _path_inputs(tree, target_probs, rule)
    length = nodes.shape[0]
    law: dict[tuple[int, ...], float] = {}
    for tau, chance in enumerate(plan.stop_law().tolist()):
        residual = plan.residual_probs[tau] if tau < length else target_probs[length]
        prefix = tuple(tree.tokens[nodes[:tau]].tolist())
        for token in torch.nonzero(residual > 0).flatten().tolist():
            law[prefix + (token,)] = law.get(prefix + (token,), 0.0) + chance * float(residual[token])
    return law


def walk(
    tree: DraftTree, target_probs: Tensor, rule: Rule, generator: torch.Generator | None
) -> tuple[list[int], list[int], list[int]]:
    """Sample one step's tokens. target_probs [n + 1, V]: p at the root (row 0) and at each node.

    Returns (emitted tokens, accepted path of nodes, candidates seen per level).
    """
    if judges_path(tree, rule):
        return _walk_path(tree, target_probs, rule, generator)
    context, path, emitted, levels = -1, [], [], []
    while True:
        row = context + 1
        candidates = _choice_inputs(tree, context, rule)
        if candidates is None:
            token = int(sample_categorical(target_probs[row : row + 1], generator)[0, 0])
        else:
            levels.append(int(candidates.numel()))
            chosen, _ = rule.select_unchecked(
                target_probs[row : row + 1], tree.draft_probs[row : row + 1], candidates[None], generator
            )
            token = int(chosen[0])
        emitted.append(token)
        child = tree.child(context, token) if tree.num_nodes else None
        if child is None:
            return emitted, path, levels
        path.append(child)
        context = child


def walk_law(tree: DraftTree, target_probs: Tensor, rule: Rule) -> dict[tuple[int, ...], float]:
    """Exact law of the tokens `walk` emits: {emitted tokens: probability}."""
    law: dict[tuple[int, ...], float] = {}
    if judges_path(tree, rule):
        return _path_law(tree, target_probs, rule)

    def visit(context: int, prefix: tuple[int, ...], weight: float) -> None:
        row = context + 1
        candidates = _choice_inputs(tree, context, rule)
        if candidates is None:
            step = target_probs[row]
        else:
            plan = rule.plan(target_probs[row : row + 1], tree.draft_probs[row : row + 1], candidates[None])
            step = law_of_plan(plan, candidates[None])[0][0]
        for token in torch.nonzero(step > 0).flatten().tolist():
            child = tree.child(context, token) if tree.num_nodes else None
            if child is None:
                key = prefix + (token,)
                law[key] = law.get(key, 0.0) + weight * float(step[token])
            else:
                visit(child, prefix + (token,), weight * float(step[token]))

    visit(-1, (), 1.0)
    return law
