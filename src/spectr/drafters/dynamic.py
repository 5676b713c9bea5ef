"""Dynamic draft trees (EAGLE-2, Li et al. 2024): the nodes the draft is most confident in, under a budget.

Instead of k i.i.d. drafts of L tokens, the tree is grown from the draft's own
confidence: a node's score is the draft probability of its whole path (the
product of q along it), an estimate of the chance that the target accepts it.
Depth by depth the `width` best-scoring nodes of the newest depth are run
through the draft and each gets its `width` most likely tokens as children;
after `depth` levels the `budget` best-scoring nodes are kept. A child never
scores above its parent, so the kept set is a tree (ties go to the shallower
node).

The nodes are chosen, not sampled, so the tree carries no draft law and the
walk verifies it the exact way for a deterministic tree: sample from p at the
root, follow the tree while the sampled token is a child (walk.py). That is
also the best any rule can do with a fixed set of children: the chance to go
on is p(children).

Ranking uses the draft's law under the sampling parameters, or at T = 1 when
decoding is greedy (a greedy law is one-hot, and the ranking needs the
runner-up tokens); the choice of nodes never changes what is emitted, only
how many tokens a step keeps.
"""

from dataclasses import replace
import heapq

import torch

from spectr.processing import SamplingParams
from spectr.tree import DraftTree


def ranking_params(params: SamplingParams) -> SamplingParams:
    """The processing whose draft law ranks the nodes: the sampler's own, or at T = 1 for greedy decoding
    (its bias and penalties kept)."""
    return replace(params, temperature=1.0) if params.temperature == 0 else params


def grow_dynamic_tree(root_probs: torch.Tensor, width: int, depth: int, budget: int, forward_nodes):
    """The best `budget` nodes of a tree grown `depth` levels deep, `width` expansions and children a level.

    root_probs [V]: the draft's ranking law at the root. forward_nodes(new, tokens, parents, level) runs the
    nodes `new` (indices into tokens/parents, the nodes run so far, in the order they were run; all at
    depth level + 1) through the draft and returns their ranking law [n, V] — the contract of
    drafters.iid.grow_tree, so a drafter's cache slots follow the run order.
    Returns (tree, slots): slots[node] is the node's index in run order, or −1 for a node never run.
    """
    # Candidates: every node ever proposed. Each has a token, a parent candidate (−1: the root), a path
    # score and a depth; `run` maps a candidate to its index in run order once it went through the draft.
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    depths: list[int] = []
    run: dict[int, int] = {}
    run_tokens: list[int] = []
    run_parents: list[int] = []

    def add_children(parent: int, probs: torch.Tensor, parent_score: float, level: int) -> list[int]:
        top = probs.topk(min(width, probs.shape[0]))
        added = []
        for prob, token in zip(top.values.tolist(), top.indices.tolist()):
            if prob <= 0:
                break
            tokens.append(token)
            parents.append(parent)
            scores.append(parent_score * prob)
            depths.append(level)
            added.append(len(tokens) - 1)
        return added

    newest = add_children(-1, root_probs, 1.0, 1)
    for level in range(1, depth):
        expand = heapq.nlargest(width, newest, key=lambda c: scores[c])
        if not expand:
            break
        first = len(run_tokens)
        for candidate in expand:
            run[candidate] = len(run_tokens)
            run_tokens.append(tokens[candidate])
            run_parents.append(run[parents[candidate]] if parents[candidate] >= 0 else -1)
        rows = forward_nodes(torch.arange(first, len(run_tokens)), run_tokens, run_parents, level - 1)
        newest = []
        for candidate, probs in zip(expand, rows):
            newest.extend(add_children(candidate, probs, scores[candidate], level + 1))
    # Keep the best; a child never scores above its parent and ties go to the shallower node, so every
    # kept node's parent is kept. Then number them depth by depth (parents first), as trees are.
    kept = sorted(heapq.nsmallest(budget, range(len(tokens)), key=lambda c: (-scores[c], depths[c], c)),
                  key=lambda c: (depths[c], c))
    number = {candidate: i for i, candidate in enumerate(kept)}
    tree_parents = [number[parents[c]] if parents[c] >= 0 else -1 for c in kept]
    tree = DraftTree(
        tokens=torch.tensor([tokens[c] for c in kept], dtype=torch.long),
        parents=torch.tensor(tree_parents, dtype=torch.long),
        paths=leaf_paths(tree_parents),
        draft_probs=None,
    )
    return tree, [run.get(c, -1) for c in kept]


def leaf_paths(parents: list[int]) -> torch.Tensor:
    """Root-to-leaf node paths of a tree given its parents, padded with −1 to the deepest. [leaves, depth]"""
    children = set(parents)
    paths = []
    for leaf in range(len(parents)):
        if leaf in children:
            continue
        path, node = [], leaf
        while node >= 0:
            path.append(node)
            node = parents[node]
        paths.append(path[::-1])
    longest = max((len(p) for p in paths), default=0)
    return torch.tensor([p + [-1] * (longest - len(p)) for p in paths], dtype=torch.long).reshape(len(paths), longest)
