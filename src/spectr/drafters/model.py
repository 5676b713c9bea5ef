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

from spectr.drafters.shapes import grow_shape
from spectr.processing import SamplingParams
from spectr.tree import DraftTree, tree_attention_mask


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

    def prefill(self, text: list[int]) -> None:
        """The draft's cache takes in the prompt but its last token (the first root, run by propose)."""
        if len(text) - 1 > self.cached:
            self.lm.forward(torch.tensor([text[self.cached : -1]]), torch.arange(self.cached, len(text) - 1),
                            self.cache, logit_indices=torch.tensor([], dtype=torch.long))
            self.cached = len(text) - 1

    def propose(
        self, text: list[int], k: int, length: int, params: SamplingParams, generator: torch.Generator,
        tree: str = "iid", budget: int | None = None,
    ) -> DraftTree:
        pending = torch.tensor(text[self.cached :], dtype=torch.long)  # at least the root
        out = self.lm.forward(
            pending[None], torch.arange(self.cached, len(text)), self.cache,
            logit_indices=torch.tensor([pending.numel() - 1]),
        )
        self.cached = self._base = len(text)

        def forward_logits(new, tokens, parents, depth):
            # The i-th node run sits in cache slot base + i.
            mask = tree_attention_mask(torch.tensor(parents), cached=self._base - 1)[1 + new]
            positions = torch.full((new.numel(),), self._base + depth)
            return self.lm.forward(torch.tensor(tokens)[new][None], positions, self.cache, mask).logits[0]

        drafted, self._slots = grow_shape(tree, out.logits[0, 0], params, k, length, generator, forward_logits,
                                          budget)
        return drafted

    def commit(self, path: list[int]) -> None:
        # The nodes of a path that went through the draft are a prefix of it (only a node run has children).
        kept = [self._slots[node] for node in itertools.takewhile(lambda node: self._slots[node] >= 0, path)]
        self.cache.commit(self._base, [self._base + slot for slot in kept])
        self.cached = self._base + len(kept)
