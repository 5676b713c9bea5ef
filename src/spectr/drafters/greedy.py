"""Greedy draft trees (after Hu et al., ICLR 2025, "greedy drafting"): the draft's likeliest tokens chosen,
one more token drawn from the rest.

At each of L levels the node on the spine gets k children: its k − 1 likeliest
tokens under q (chosen, not sampled) and one token X drawn from q', q with those
tokens removed and renormalised. The spine goes on through the likeliest child.

Verification at a spine node runs the standard rule on X against the full p
with q' as its draft law: accept X with min(1, p(X)/q'(X)), else draw from
r ∝ max(0, p − q'). X ~ q' exactly, so the emitted token has law p; the
residual keeps all of the chosen tokens' mass (q' is zero there), and when its
draw is a chosen child the walk goes on there (walk.py). The chance to go on
is p(T) + Σ_{x∉T} min(p(x), q'(x)) for the chosen set T: the maximal coupling
of X with p, which no rule over these candidates can beat.

For greedy decoding the tree is built from the draft's law at T = 1 (as dynamic
trees rank, drafters/dynamic.py): a greedy law is one-hot and would leave no
runner-up to choose. The standard rule stays exact with any draft law X was
truly drawn from, so this changes only how many tokens a step keeps.
"""

import torch

from spectr.sampling import sample_categorical
from spectr.tree import DraftTree


def grow_greedy_tree(root_probs: torch.Tensor, k: int, length: int, generator: torch.Generator, forward_nodes):
    """The greedy tree of `length` levels, k children a level. root_probs [V]: q at the root.

    forward_nodes(new, tokens, parents, level): drafters.iid.grow_tree's contract, over the nodes run so far
    (the spine, in order). Returns (tree, slots): slots[node] its index in run order, −1 if never run.
    """
    tokens: list[int] = []
    parents: list[int] = []
    sampled: list[bool] = []
    zero = root_probs.new_zeros(root_probs.shape)
    rows = [zero]  # row 0: the root; row 1 + node: the law its drawn child came from (q'), zero elsewhere

    def add(token: int, parent: int, drawn: bool) -> int:
        tokens.append(token)
        parents.append(parent)
        sampled.append(drawn)
        rows.append(zero)
        return len(tokens) - 1

    spine, run_tokens, run_parents, slots = -1, [], [], {}
    probs = root_probs
    for level in range(length):
        chosen = probs.topk(min(k - 1, int((probs > 0).sum()))).indices.tolist() if k > 1 else []
        rest = probs.clone()
        rest[chosen] = 0
        children = [add(token, spine, False) for token in chosen]
        if rest.sum() > 0:  # q': q without the chosen tokens, and one token drawn from it
            law = rest / rest.sum()
            children.append(add(int(sample_categorical(law[None], generator)[0, 0]), spine, True))
            rows[1 + spine] = law
        if level == length - 1:
            break
        spine = children[0]  # the likeliest child (the drawn one when k = 1)
        slots[spine] = len(run_tokens)
        run_parents.append(len(run_tokens) - 1)  # the spine is a chain: each run node's parent ran just before
        run_tokens.append(tokens[spine])
        probs = forward_nodes(torch.tensor([len(run_tokens) - 1]), run_tokens, run_parents, level)[0]
    tree = DraftTree(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        paths=torch.empty(0, 0, dtype=torch.long),
        draft_probs=torch.stack(rows),
        sampled=torch.tensor(sampled, dtype=torch.bool),
    )
    return tree, [slots.get(node, -1) for node in range(len(tokens))]
