"""SpecTr's draft trees: k drafts of L tokens sampled i.i.d. from the draft, merged into a prefix tree."""

import torch

from spectr.sampling import sample_categorical
from spectr.tree import DraftTree


def grow_tree(root_probs, k: int, length: int, generator: torch.Generator, forward_nodes) -> tuple[DraftTree, int]:
    """Sample k i.i.d. drafts of `length` tokens, depth by depth, merged into a prefix tree.

    root_probs [V]: q at the root. forward_nodes(new, tokens, parents, depth) runs the nodes `new`
    (indices into tokens/parents, all at `depth`) through the draft and returns their q rows [n, V].
    Returns the tree (leaves carry zero rows: they were never run) and how many nodes were run.
    """
    rows = [root_probs]
    tokens: list[int] = []
    parents: list[int] = []
    paths = torch.empty(k, length, dtype=torch.long)
    drawn = sample_categorical(root_probs[None], generator, num_samples=k)[0]  # [k] i.i.d. from q(root)
    for depth in range(length):
        first_new = len(tokens)
        seen: dict[tuple[int, int], int] = {}
        for draft in range(k):
            key = (int(paths[draft, depth - 1]) if depth else -1, int(drawn[draft]))
            if key not in seen:
                seen[key] = len(tokens)
                tokens.append(key[1])
                parents.append(key[0])
            paths[draft, depth] = seen[key]
        if depth == length - 1:
            break
        rows.extend(forward_nodes(torch.arange(first_new, len(tokens)), tokens, parents, depth))
        node_rows = torch.stack(rows)[1 + paths[:, depth]]  # [k, V] q below each draft's node
        drawn = sample_categorical(node_rows, generator)[:, 0]
    forwarded = len(rows) - 1
    leaves = len(tokens) - forwarded
    draft_probs = torch.cat([torch.stack(rows), root_probs.new_zeros(leaves, root_probs.shape[0])])
    tree = DraftTree(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        paths=paths,
        draft_probs=draft_probs,
    )
    return tree, forwarded
