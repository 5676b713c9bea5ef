"""The drafter interface the decoding loop talks to."""

from typing import Protocol

import torch

from spectr.processing import SamplingParams
from spectr.tree import DraftTree


class Drafter(Protocol):
    name: str

    def reset(self, capacity: int) -> None:
        """Forget any previous text; room for `capacity` tokens of text plus drafts."""

    def propose(
        self, text: list[int], k: int, length: int, params: SamplingParams, generator: torch.Generator
    ) -> DraftTree:
        """k draft continuations of `length` tokens after `text` (which ends with the tree's root)."""

    def commit(self, path: list[int]) -> None:
        """The walk accepted these nodes of the last tree: keep only them (and the text before)."""
