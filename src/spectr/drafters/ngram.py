"""Prompt lookup: propose continuations of the text's own earlier occurrences of its last n tokens.

The proposals are deterministic (no draft distribution), so the tree carries
no draft_probs and the walk samples the target and follows the tree (exact).
"""

import torch

from spectr.processing import SamplingParams
from spectr.tree import DraftTree, merge_drafts


class NgramDrafter:
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def reset(self, capacity: int) -> None:
        pass

    def continuations(self, text: list[int], k: int, length: int) -> list[list[int]]:
        """Up to k distinct continuations (of up to `length` tokens) that followed the text's
        longest recurring suffix, most recent occurrence first."""
        found: list[list[int]] = []
        for size in range(min(self.max_ngram, len(text) - 1), self.min_ngram - 1, -1):
            suffix = text[-size:]
            for start in range(len(text) - size - 1, -1, -1):
                if text[start : start + size] == suffix:
                    follow = text[start + size : start + size + length]
                    if follow and follow not in found:
                        found.append(follow)
                        if len(found) == k:
                            return found
            if found:
                return found
        return found

    def propose(
        self, text: list[int], k: int, length: int, params: SamplingParams, generator: torch.Generator,
        tree: str = "iid", budget: int | None = None,
    ) -> DraftTree:
        """Up to k continuations of `length` tokens (deterministic already: the tree kind changes nothing)."""
        proposals = self.continuations(text, k, length)
        if not proposals:
            empty = torch.empty(0, dtype=torch.long)
            return DraftTree(tokens=empty, parents=empty, paths=empty.reshape(0, 0), draft_probs=None)
        longest = max(len(p) for p in proposals)
        proposals = [p for p in proposals if len(p) == longest]  # equal lengths make a well-formed tree
        tokens, parents, paths = merge_drafts(torch.tensor(proposals, dtype=torch.long))
        return DraftTree(tokens=tokens, parents=parents, paths=paths, draft_probs=None)

    def commit(self, path: list[int]) -> None:
        pass
