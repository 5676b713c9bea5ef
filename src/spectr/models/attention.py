"""Attention of a few new tokens over the KV cache, written for decoding.

A decode step or a tree verification brings 1–64 queries; torch's fused
scaled-dot-product attention spends ~130 µs a layer on a single query here,
where a plain grouped-query matmul–softmax–matmul takes ~48 µs. Long prefills
keep the fused kernel, which never materialises the [queries, slots] scores.

Shapes: B sequences, H query heads, G key/value heads (H = r·G), T new
tokens, S attended slots, E head dim.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from spectr.errors import InvalidInputError

FEW_QUERIES = 64  # up to this many new tokens, the matmul path


def attend(queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """softmax(q·kᵀ / √E, where mask) · v.

    queries [B, H, T, E]; keys, values [B, G, S, E]; mask [B, 1, T, S] bool (True: may attend).
    Returns [B, H, T, E]. Every query attends at least to itself, so no row is empty.
    """
    batch, heads, tokens, head_dim = queries.shape
    kv_heads = keys.shape[1]
    if tokens > FEW_QUERIES:
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=heads != kv_heads)
    group = heads // kv_heads
    # The r query heads of a group share its keys: fold them into the rows of one matmul per group.
    grouped = queries.reshape(batch, kv_heads, group * tokens, head_dim)  # [B, G, r·T, E]
    # In float32, as the fused kernel accumulates: bf16 scores would move the weights by ~1 %.
    scores = torch.matmul(grouped.float(), keys.float().transpose(-1, -2)) * head_dim ** -0.5  # [B, G, r·T, S]
    scores = scores.view(batch, kv_heads, group, tokens, -1).masked_fill_(~mask[:, :, None], float("-inf"))
    weights = scores.softmax(-1).view(batch, kv_heads, group * tokens, -1)
    return torch.matmul(weights, values.float()).to(queries.dtype).view(batch, heads, tokens, head_dim)


@dataclass(frozen=True)
class SparQ:
    """SparQ attention (Ribar et al., 2023) for a draft: per query, the `rank` largest components (of the
    group's queries together) score every older slot approximately from those components of the keys
    alone; the `keep` older slots the group's heads weigh most are attended exactly, plus the `window`
    most recent slots (the draft's own tokens among them), and the weight the approximate scores put on
    the slots left out goes to the mean of the older values (the paper's mean-value correction).

    It changes the output: spectr uses it only to draft, where the target verifies (exact), or where a
    user asks for an approximate mode by name.
    """

    rank: int = 16  # r of the head's components (64 for the default target): a quarter of the key cache read
    keep: int = 128  # k older slots attended exactly
    window: int = 64  # the most recent slots, always attended exactly

    def __post_init__(self):
        if self.rank < 1 or self.keep < 1 or self.window < 0:
            raise InvalidInputError(f"SparQ needs rank >= 1, keep >= 1 and window >= 0, got {self}")

    def dense_from(self, start: int) -> int:
        """The first slot attended exactly whatever its score, for new tokens written from slot `start`: the
        window before them, from a whole tile of 16 slots (the kernel scores 16 slots at a time)."""
        return max(0, (start - self.window) // 16 * 16)


def sparq_attend(queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor, value_mean: Tensor, sparq: SparQ,
                 dense_from: int) -> Tensor:
    """SparQ attention (see SparQ), the reference the kernel is tested against.

    queries [B, H, T, E]; keys, values [B, G, S, E]; mask [B, 1, T, S] bool; value_mean [B, G, E]: the mean
    of the values in slots 0..dense_from-1, every one of which each query sees. Slots from dense_from on
    are attended exactly where the mask lets them. Where a query's older slots number `keep` or fewer it
    is plain attention. Returns [B, H, T, E].
    """
    batch, heads, tokens, head_dim = queries.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    q = queries.float().view(batch, kv_heads, group, tokens, head_dim)
    k, v = keys.float(), values.float()
    seen = mask.view(batch, 1, tokens, slots)  # [B, 1, T, S] against [B, G, T, S]
    rank = min(sparq.rank, head_dim)
    components = q.abs().sum(2).topk(rank, -1).indices  # [B, G, T, r]: the group's largest, together
    q_part = q.gather(-1, components[:, :, None].expand(-1, -1, group, -1, -1))  # [B, G, group, T, r]
    k_part = k[:, :, None].expand(-1, -1, tokens, -1, -1).gather(
        -1, components[:, :, :, None].expand(-1, -1, -1, slots, -1))  # [B, G, T, S, r]
    # The paper's temperature: the components kept carry this share of the query's L1 norm.
    share = q_part.abs().sum(-1) / q.abs().sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    scale = (head_dim * share.clamp_min(torch.finfo(torch.float32).tiny)).rsqrt()  # [B, G, group, T]
    approximate = torch.einsum("bghtr,bgtsr->bghts", q_part, k_part) * scale[..., None]
    weights = approximate.masked_fill(~seen[:, :, None], float("-inf")).softmax(-1)  # [B, G, group, T, S]
    older = weights.sum(2)[..., :dense_from].masked_fill(~seen[..., :dense_from], -1.0)  # [B, G, T, dense_from]
    chosen = seen.expand(batch, kv_heads, tokens, slots).clone()
    sparse = int(seen[..., :dense_from].sum(-1).max()) > sparq.keep if dense_from else False
    if sparse:
        chosen[..., :dense_from] = False
        chosen[..., :dense_from].scatter_(-1, older.topk(sparq.keep, -1).indices, True)
        chosen &= seen
    whole = (chosen == seen).all(-1)[:, :, None]  # [B, G, 1, T]: every slot it sees is attended exactly
    kept = torch.where(whole, 1.0, (weights * chosen[:, :, None]).sum(-1))  # [B, G, group, T]
    exact = torch.einsum("bghte,bgse->bghts", q, k) * head_dim ** -0.5
    attended = torch.einsum("bghts,bgse->bghte", exact.masked_fill(~chosen[:, :, None], float("-inf")).softmax(-1), v)
    out = kept[..., None] * attended + (1 - kept[..., None]) * value_mean.float()[:, :, None, None]
    return out.reshape(batch, heads, tokens, head_dim).to(queries.dtype)
