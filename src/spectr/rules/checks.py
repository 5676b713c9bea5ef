"""Input checks shared by the selection rules.

The rules are exact only for valid distributions and candidates that could
have been drawn from the draft; anything else is rejected here with a message
that names the problem, before any randomness is consumed.
"""

from torch import Tensor
import torch

from spectr.errors import InvalidInputError

SUM_TOLERANCE = 1e-4


def check_distribution(probs: Tensor, name: str) -> None:
    """Raise unless `probs` [..., V] is a batch of probability vectors."""
    if not isinstance(probs, Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise InvalidInputError(f"{name} must be a floating-point tensor, got dtype {probs.dtype}")
    if probs.ndim == 0 or probs.shape[-1] == 0:
        raise InvalidInputError(f"{name} must have a non-empty vocabulary axis, got shape {tuple(probs.shape)}")
    # Two passes over the data: a NaN or inf entry makes its row's sum non-finite.
    sums = probs.sum(-1, dtype=torch.float64)
    if not bool(torch.isfinite(sums).all()):
        raise InvalidInputError(f"{name} has non-finite entries (NaN or inf)")
    smallest = probs.min().item()
    if smallest < 0:
        raise InvalidInputError(f"{name} has negative entries (smallest {smallest:.3g})")
    worst = (sums - 1).abs().max().item()
    if worst > SUM_TOLERANCE:
        raise InvalidInputError(
            f"{name} must sum to 1 (within {SUM_TOLERANCE:g}); off by {worst:.3g}"
        )


def check_pair(target_probs: Tensor, draft_probs: Tensor, ndim: int) -> None:
    """Raise unless target and draft are distributions of the same shape with `ndim` axes."""
    check_distribution(target_probs, "target_probs")
    check_distribution(draft_probs, "draft_probs")
    if target_probs.shape != draft_probs.shape:
        raise InvalidInputError(
            f"target_probs and draft_probs must have the same shape, got "
            f"{tuple(target_probs.shape)} and {tuple(draft_probs.shape)}"
        )
    if target_probs.ndim != ndim:
        expected = "[vocab]" if ndim == 1 else "[batch, vocab]"
        raise InvalidInputError(
            f"probabilities must have shape {expected}, got {tuple(target_probs.shape)}"
        )


def check_draft(draft_probs: Tensor, ndim: int) -> None:
    """Raise unless draft_probs is a distribution with `ndim` axes ([V] or [N, V])."""
    check_distribution(draft_probs, "draft_probs")
    if draft_probs.ndim != ndim:
        expected = "[vocab]" if ndim == 1 else "[batch, vocab]"
        raise InvalidInputError(f"draft_probs must have shape {expected}, got {tuple(draft_probs.shape)}")


def check_num_candidates(k: object) -> int:
    """Return `k` as an int, raising unless it is an integer >= 1."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise InvalidInputError(f"k (number of candidates) must be an int, got {type(k).__name__}")
    if k < 1:
        raise InvalidInputError(f"k (number of candidates) must be >= 1, got {k}")
    return k


def check_candidates(candidates: Tensor, draft_probs: Tensor) -> None:
    """Raise unless `candidates` [..., k] are tokens the draft `[..., V]` could have proposed."""
    if not isinstance(candidates, Tensor):
        raise InvalidInputError(f"candidates must be a torch.Tensor, got {type(candidates).__name__}")
    if candidates.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise InvalidInputError(f"candidates must be an integer tensor, got dtype {candidates.dtype}")
    if candidates.ndim != draft_probs.ndim or candidates.shape[:-1] != draft_probs.shape[:-1]:
        raise InvalidInputError(
            f"candidates of shape {tuple(candidates.shape)} do not match probabilities of shape "
            f"{tuple(draft_probs.shape)}"
        )
    if candidates.shape[-1] == 0:
        raise InvalidInputError("at least one candidate is needed (k >= 1)")
    vocab = draft_probs.shape[-1]
    outside = (candidates < 0) | (candidates >= vocab)
    if bool(outside.any()):
        bad = candidates[outside][0].item()
        raise InvalidInputError(f"candidate token {bad} is outside the vocabulary [0, {vocab})")
    drawn_with = draft_probs.gather(-1, candidates.long())
    if bool((drawn_with <= 0).any()):
        bad = candidates[drawn_with <= 0][0].item()
        raise InvalidInputError(
            f"candidate token {bad} has draft probability 0: candidates must be drawn from draft_probs"
        )
