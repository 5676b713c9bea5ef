"""A draft model: any causal LM with the target's tokenizer, behind spectr's forward interface.

Drafting builds the tree depth by depth: the k drafts are sampled i.i.d. from
the draft's processed distribution, drafts that share a prefix share a node,
and each depth is one forward over the new nodes only (tree attention on the
draft's own cache). Every draft through a node samples its next token from
that node's one distribution, the one stored in the tree for the acceptance
test.
"""

import itertools

import torch

from spectr.drafters.dynamic import grow_dynamic_tree, ranking_params
from spectr.drafters.greedy import grow_greedy_tree
from spectr.processing import SamplingParams, logits_to_probs
from spectr.sampling import sample_categorical
from spectr.tree import DraftTree, tree_attention_mask


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


class ModelDrafter:
    name = "model"

    def __init__(self, lm):
        self.lm = lm
        self.cache = None
        self.cached = 0  # text tokens held by the cache
        self._base = 0  # text length when the last tree was drafted
        self._slots: list[int] = []  # per node of the last tree: its cache slot after _base, −1 if never run

    def reset(self, capacity: int) -> None:
        self.cache = self.lm.new_cache(capacity)
        self.cached = 0

    def propose(
        self, text: list[int], k: int, length: int, params: SamplingParams, generator: torch.Generator,
        budget: int | None = None, greedy: bool = False,
    ) -> DraftTree:
        pending = torch.tensor(text[self.cached :], dtype=torch.long)  # at least the root
        out = self.lm.forward(
            pending[None], torch.arange(self.cached, len(text)), self.cache,
            logit_indices=torch.tensor([pending.numel() - 1]),
        )
        self.cached = self._base = len(text)

        law = params if budget is None and not greedy else ranking_params(params)

        def forward_nodes(new, tokens, parents, depth):
            # The i-th node run sits in cache slot base + i.
            mask = tree_attention_mask(torch.tensor(parents), cached=self._base - 1)[1 + new]
            positions = torch.full((new.numel(),), self._base + depth)
            logits = self.lm.forward(torch.tensor(tokens)[new][None], positions, self.cache, mask).logits[0]
            return logits_to_probs(logits, law)

        root_probs = logits_to_probs(out.logits[0], law)[0]
        if budget is not None:
            tree, self._slots = grow_dynamic_tree(root_probs, k, length, budget, forward_nodes)
            return tree
        if greedy:
            tree, self._slots = grow_greedy_tree(root_probs, k, length, generator, forward_nodes)
            return tree
        tree, forwarded = grow_tree(root_probs, k, length, generator, forward_nodes)
        self._slots = [node if node < forwarded else -1 for node in range(tree.num_nodes)]  # leaves never ran
        return tree

    def commit(self, path: list[int]) -> None:
        # The nodes of a path that went through the draft are a prefix of it (only a node run has children).
        kept = [self._slots[node] for node in itertools.takewhile(lambda node: self._slots[node] >= 0, path)]
        self.cache.commit(self._base, [self._base + slot for slot in kept])
        self.cached = self._base + len(kept)
