"""Approximate modes: the target run with SparQ attention in its decoding passes.

This is *not* the target's distribution: each next-token law moves by a small, measured amount (`spectr
bench --approximate` reports its mean total variation from the exact law). It is opt-in by name and
labelled approximate wherever it appears (the engine's description, the stats line, bench results).
A SparQ *draft* (drafters/self_draft.py) is the exact way to use the same attention.
"""

from spectr.errors import InvalidInputError
from spectr.models.attention import SparQ

# Passes of more new tokens than this (a prompt's) attend exactly: SparQ approximates decoding steps.
DECODING_TOKENS = 64


def check_sparse(lm) -> None:
    """Refuse a forward that cannot attend by SparQ (transformers' reference, torch.compile's)."""
    if not getattr(lm, "supports_sparse", False):
        raise InvalidInputError(f"SparQ attention needs spectr's own forward, not "
                                f"{getattr(lm, 'backend', type(lm).__name__)}")


class SparQForward:
    """A forward whose decoding passes use SparQ attention; everything else is the wrapped forward's."""

    approximate = True

    def __init__(self, lm, sparse: SparQ):
        check_sparse(lm)
        self.lm, self.sparse = lm, sparse

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def forward(self, tokens, positions, cache, attention_mask=None, **options):
        sparse = self.sparse if tokens.shape[-1] <= DECODING_TOKENS else None
        return self.lm.forward(tokens, positions, cache, attention_mask, sparse=sparse, **options)

    def describe(self) -> str:
        return (f"APPROXIMATE: SparQ attention in the target's decoding passes (rank {self.sparse.rank}, "
                f"{self.sparse.keep} older slots kept, the last {self.sparse.window} exact), not its exact law")
