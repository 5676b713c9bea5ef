"""One home for building a draft tree of a given kind, shared by every drafter that runs a network.

A drafter supplies the root's logits and `forward_logits(new, tokens, parents, level)` (its network over the
nodes `new` of the nodes run so far, in run order: drafters.iid.grow_tree's contract); this module turns
logits into the law the nodes are drawn from or ranked by and grows the tree the decoder asked for.
"""

import torch

from spectr.drafters.dynamic import grow_dynamic_tree, ranking_params
from spectr.drafters.greedy import grow_greedy_tree
from spectr.drafters.iid import grow_tree
from spectr.processing import SamplingParams, logits_to_probs, node_paths
from spectr.tree import DraftTree


def grow_shape(tree: str, root_logits: torch.Tensor, params: SamplingParams, k: int, length: int,
               generator: torch.Generator, forward_logits, budget: int | None = None) -> tuple[DraftTree, list[int]]:
    """The tree of kind `tree` ("iid", "dynamic" with `budget` nodes, "greedy") over root logits [V].

    Returns (tree, slots): slots[node] is the node's index in run order (its place in the drafter's cache
    after the root), −1 for a node never run through the draft.
    """
    law = params if tree == "iid" else ranking_params(params)  # chosen nodes need a runner-up at T = 0

    def forward_nodes(new, tokens, parents, level):
        # With a penalty on, a node's law counts the tokens on its path too (processing.py).
        paths = node_paths(tokens, parents, new.tolist()) if law.reads_history else None
        return logits_to_probs(forward_logits(new, tokens, parents, level), law, paths)

    root_probs = logits_to_probs(root_logits[None], law)[0]
    if tree == "dynamic":
        return grow_dynamic_tree(root_probs, k, length, budget, forward_nodes)
    if tree == "greedy":
        return grow_greedy_tree(root_probs, k, length, generator, forward_nodes)
    drafted, forwarded = grow_tree(root_probs, k, length, generator, forward_nodes)
    return drafted, [node if node < forwarded else -1 for node in range(drafted.num_nodes)]  # leaves never ran
