"""Draft trees: k draft sequences merged into a prefix tree, its attention mask, and its positions.

A tree hangs below a *root*: the last emitted token, which neither model has
cached yet. Nodes are numbered 0..n-1 in order of depth (a parent always
comes before its children); `parents[i] = -1` for a child of the root.
Each draft i is a root-to-leaf path `paths[i]` of L nodes; drafts with equal
prefixes share nodes, and a node's multiplicity is how many drafts pass
through it.

Row r of `draft_probs` is the draft distribution the children of context r
were sampled from: row 0 for the root, row 1 + i for node i. Since all drafts
through a node share one context, one distribution serves them all — the very
one used later in the acceptance test.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DraftTree:
    tokens: Tensor  # [n] token of each node
    parents: Tensor  # [n] parent node, -1 for a child of the root
    paths: Tensor  # [k, L] node of draft i at depth j + 1
    draft_probs: Tensor | None  # [n + 1, V] q at the root (row 0) and below each node (row 1 + i);
    # None for deterministic proposals (n-gram lookups)
    sampled: Tensor | None = None  # [n] bool: the node was drawn from its parent's row; None: every node was.
    # A tree may mix drawn children with chosen ones (greedy trees): the rule sees the drawn ones only, the
    # chosen ones are reached when the rule's residual draw lands on them.

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[0]

    @property
    def depths(self) -> Tensor:  # [n], 1 for a child of the root
        depth = torch.zeros(self.num_nodes, dtype=torch.long)
        for node, parent in enumerate(self.parents.tolist()):
            depth[node] = 1 if parent < 0 else depth[parent] + 1
        return depth

    def candidates(self, context: int) -> Tensor:
        """Next tokens of the drafts through `context` (−1 = root, else a node), in draft order. [k']"""
        if self.sampled is not None:
            return self.tokens[(self.parents == context) & self.sampled]
        if context < 0:
            return self.tokens[self.paths[:, 0]]
        hits = self.paths == context  # [k, L]: a node sits in one column, its depth - 1
        depth = int(hits.nonzero()[0, 1]) + 1
        if depth >= self.paths.shape[1]:
            return torch.empty(0, dtype=torch.long)
        return self.tokens[self.paths[hits.any(-1), depth]]

    def child(self, context: int, token: int) -> int | None:
        """The node below `context` carrying `token`, if any."""
        match = (self.parents == context) & (self.tokens == token)
        return int(match.nonzero()[0]) if bool(match.any()) else None


def merge_drafts(sequences: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge draft sequences [k, L] into a prefix tree: (tokens [n], parents [n], paths [k, L]).

    >>> merge_drafts(torch.tensor([[5, 6], [5, 7], [8, 6]]))[1].tolist()
    [-1, -1, 0, 0, 1]
    """
    num_drafts, length = sequences.shape
    tokens: list[int] = []
    parents: list[int] = []
    paths = torch.empty(num_drafts, length, dtype=torch.long)
    for depth in range(length):  # depth by depth, so parents come first
        seen: dict[tuple[int, int], int] = {}
        for draft in range(num_drafts):
            parent = int(paths[draft, depth - 1]) if depth else -1
            key = (parent, int(sequences[draft, depth]))
            if key not in seen:
                seen[key] = len(tokens)
                tokens.append(key[1])
                parents.append(parent)
            paths[draft, depth] = seen[key]
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long), paths


def tree_attention_mask(parents: Tensor, cached: int) -> Tensor:
    """Mask for a forward over [root, node 0, ..., node n-1] on top of `cached` slots.

    Returns bool [n + 1, cached + n + 1]: every row sees the cached slots and
    the root; a node also sees its ancestors and itself.

    >>> tree_attention_mask(torch.tensor([-1, 0, -1]), cached=1).int().tolist()
    [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    """
    num_nodes = parents.shape[0]
    sees = torch.eye(num_nodes + 1, dtype=torch.bool)  # over [root, nodes]
    sees[:, 0] = True
    for node, parent in enumerate(parents.tolist()):
        if parent >= 0:
            sees[node + 1] |= sees[parent + 1]
    return torch.cat([torch.ones(num_nodes + 1, cached, dtype=torch.bool), sees], dim=-1)


def tree_positions(parents: Tensor, cached: int) -> Tensor:
    """Positions of [root, nodes]: the root at `cached`, a node at cached + its depth. [n + 1]"""
    depth = torch.zeros(parents.shape[0] + 1, dtype=torch.long)
    for node, parent in enumerate(parents.tolist()):
        depth[node + 1] = depth[parent + 1] + 1
    return depth + cached
