"""Attention of a few new tokens over the KV cache, written for decoding.

A decode step or a tree verification brings 1–64 queries; torch's fused
scaled-dot-product attention spends ~130 µs a layer on a single query here,
where a plain grouped-query matmul–softmax–matmul takes ~48 µs. Long prefills
keep the fused kernel, which never materialises the [queries, slots] scores.

Shapes: B sequences, H query heads, G key/value heads (H = r·G), T new
tokens, S attended slots, E head dim.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

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
