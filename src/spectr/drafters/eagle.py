"""Drafting with an EAGLE-style head (trained by `spectr train-draft`, see training/eagle.py).

The head's entry at position j reads (g_{j-1}, x_j): the target's feature after
the previous token (its final hidden state, or a fusion of a low, a middle and
a high layer for an EAGLE-3-style head) and the token itself. Entries of committed text read the
target's true features, which the decoder hands over after every verification
(`observe`); entries of draft tokens read the head's own output at the parent
node. Only true-feature entries stay in the head's cache between steps, so
after each step the cache is cut back to the committed text and the accepted
tokens are re-entered next time with the target's features.

Slots: entry j sits in slot j − 1 (there is no entry 0: x_0 has no previous
feature), so a cache over c committed entries ends with the root x_c.
The k drafts are drawn i.i.d. from the head's distribution at each node and
drafts through the same node share it (drafters/iid.py, as ModelDrafter); the
other tree kinds come from the same builder (drafters/shapes.py).
"""

import torch

from spectr.drafters.shapes import grow_shape
from spectr.processing import SamplingParams
from spectr.tree import DraftTree, tree_attention_mask


class EagleDrafter:
    name = "eagle"
    uses_target_features = True

    def __init__(self, lm):
        self.lm = lm
        # A fused-feature head reads these target layers (their residual streams), fused by the head
        # itself; an EAGLE-1 head reads the target's final-norm hidden state.
        self.feature_layers = tuple(getattr(lm, "feature_layers", ()))
        self.cache = None
        self.features = None  # [capacity, D] the target's features h_0, h_1, ... of the text
        self.known = 0  # features received
        self.entries = 0  # committed entries in the cache (j = 1..entries)

    def reset(self, capacity: int) -> None:
        self.cache = self.lm.new_cache(capacity)
        self.features = torch.zeros(capacity, self.lm.config.hidden_size, dtype=self.lm.dtype)
        self.known = self.entries = 0

    def observe(self, features: torch.Tensor) -> None:
        """The target's features of the next text positions, in order: final-norm hidden states [n, D],
        or for a fused-feature head the residual streams of `feature_layers` [n, len(feature_layers), D]."""
        if self.feature_layers:
            features = self.lm.fuse_features(features)
        self.features[self.known : self.known + features.shape[0]] = features.to(self.features.dtype)
        self.known += features.shape[0]

    def prefill(self, text: list[int]) -> None:
        """The head's entries of the prompt up to its last token's (the first root's, run by propose); the
        prompt's features observed first."""
        last = len(text) - 2  # the last entry before the root's
        if last <= self.entries:
            return
        if self.known < last:
            raise RuntimeError(f"the head has the target's features of {self.known} tokens; it needs {last}")
        first = self.entries + 1
        self.lm.forward(torch.tensor(text[first : last + 1])[None], torch.arange(first, last + 1), self.cache,
                        logit_indices=torch.tensor([], dtype=torch.long),
                        features=self.features[self.entries : last][None])
        self.entries = last

    def propose(
        self, text: list[int], k: int, length: int, params: SamplingParams, generator: torch.Generator,
        tree: str = "iid", budget: int | None = None,
    ) -> DraftTree:
        root = len(text) - 1
        if self.known < root:
            raise RuntimeError(f"the head has the target's features of {self.known} tokens; it needs {root}")
        if root == 0:  # a one-token prompt: the root's entry reads a zero feature and is not kept
            first, features = 0, self.features.new_zeros(1, self.features.shape[1])
        else:
            first, features = self.entries + 1, self.features[self.entries : root]
        out = self.lm.forward(
            torch.tensor(text[first:])[None], torch.arange(first, root + 1), self.cache,
            logit_indices=torch.tensor([root - first]), features=features[None],
        )
        self.entries = root
        root_slot = self.cache.length - 1
        outputs = [out.hidden[0, -1]]  # the head's predicted feature at each forwarded node (root first)

        def forward_logits(new, tokens, parents, depth):
            mask = tree_attention_mask(torch.tensor(parents), cached=root_slot)[1 + new]
            parent_outputs = torch.stack([outputs[1 + parents[node]] for node in new.tolist()])
            node_out = self.lm.forward(
                torch.tensor(tokens)[new][None], torch.full((new.numel(),), root + 1 + depth), self.cache, mask,
                features=parent_outputs[None],
            )
            outputs.extend(node_out.hidden[0])
            return node_out.logits[0]

        return grow_shape(tree, out.logits[0, 0], params, k, length, generator, forward_logits, budget)[0]

    def commit(self, path: list[int]) -> None:
        # Draft entries read predicted features: drop them; the accepted tokens come back with the
        # target's own features on the next proposal.
        self.cache.truncate(self.entries)
