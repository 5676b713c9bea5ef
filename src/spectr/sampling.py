"""Drawing from categorical distributions, reproducibly and fast on a CPU.

torch.multinomial costs ~0.9 ms for one draw over a 49,152-token vocabulary
on this kind of machine; inverse-CDF sampling (one cumsum, one binary search)
costs a few tens of µs and consumes exactly one uniform per draw.
"""

import torch
from torch import Tensor


def sample_categorical(
    probs: Tensor, generator: torch.Generator | None = None, num_samples: int = 1
) -> Tensor:
    """i.i.d. tokens from each row of probs [N, V] (rows need not be normalised).

    Returns LongTensor [N, num_samples]. The uniforms are scaled by the row's
    total, so a token of probability 0 is never returned: its cumulative sum
    equals its predecessor's.
    """
    cumulative = probs.cumsum(-1, dtype=torch.float64)  # [N, V]
    uniforms = torch.rand(probs.shape[0], num_samples, generator=generator, dtype=torch.float64)
    tokens = torch.searchsorted(cumulative, uniforms * cumulative[:, -1:], right=True)  # first cumsum > u
    return tokens.clamp_max(probs.shape[-1] - 1)
