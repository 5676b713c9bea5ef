"""Logits → the one processed distribution that target and draft are compared under.

Temperature, top-k and top-p are applied identically to both models (SPECTR.md:
p and q are the distributions *after* processing), so the rules stay exact
with respect to the processed target. Temperature 0 is greedy: a point mass
on the argmax (the first one on ties), which turns every rule into "accept
iff the draft token is the target's argmax".
"""

from dataclasses import dataclass
import math

import torch
from torch import Tensor

from spectr.errors import InvalidInputError

NUCLEUS_SHORTLIST = 512  # top-p first looks among this many most likely tokens (a full sort is slow on CPU)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidInputError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Processed next-token distributions. logits [N, V] -> probs [N, V] float32."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k, dim=-1).values[:, -1:]  # [N, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    if params.top_p < 1:
        probs = _nucleus(probs, params.top_p)
    return probs


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p, renormalised. [N, V]"""
    shortlist = min(NUCLEUS_SHORTLIST, probs.shape[-1])
    values, indices = probs.topk(shortlist, dim=-1)  # [N, S] descending
    if shortlist < probs.shape[-1] and bool((values.sum(-1) < top_p).any()):
        values, indices = probs.sort(dim=-1, descending=True)  # the shortlist misses the nucleus
    mass_before = values.cumsum(-1) - values  # [N, S] mass of the strictly more likely tokens
    kept = torch.zeros_like(probs).scatter(-1, indices, (mass_before < top_p).to(probs.dtype))
    nucleus = probs * kept
    return nucleus / nucleus.sum(-1, keepdim=True)
