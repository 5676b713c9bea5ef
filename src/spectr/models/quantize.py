"""Linear layers for each precision mode, behind one call: layer(x) -> x @ W.T + b.

- native: the weights as the file stores them. GGUF's Q4_0 / Q4_1 blocks run
  on the group-32 int4 kernel with their own scales; Q8_0 runs exactly on the
  same kernel as two int4 halves (see `GroupInt4.from_q8_0`); dense tensors
  run in bf16. A transformers folder is dense, so native is bf16 there.
- fp32 / bf16: dense weights in that dtype.
- int8: per-output-channel symmetric int8 weights, bf16 activations, torch's
  `_weight_int8pack_mm` CPU kernel.
- int4: group-wise (32 along the input axis) asymmetric 4-bit weights,
  re-quantized from the dense weights, on the same kernel as native.

The int4 kernel (`_weight_int4pack_mm_for_cpu`) dequantises a group as
(q − 8)·scale + zero and sums each 32-group in a fixed order whatever the
number of rows, so a token's output is the same bits alone or in a tree. It
is fed bf16 activations only: with fp32 activations it runs at under 3 GB/s
on this kind of CPU.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


INT4_GROUP_SIZE = 32
INT4_INNER_K_TILES = 2


def compute_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "fp32" else torch.bfloat16


@dataclass
class Int4Term:
    """One group-32 int4 weight [out, in]: W = (codes − 8)·scales + zeros, per group of 32 inputs."""

    codes: Tensor  # [out, in] int32 in 0..15
    scales: Tensor  # [out, in / 32] float32
    zeros: Tensor  # [out, in / 32] float32

    def dequantize(self) -> Tensor:  # [out, in] float32
        out, inputs = self.codes.shape
        groups = self.codes.float().view(out, -1, INT4_GROUP_SIZE).sub_(8)
        return groups.mul_(self.scales[..., None]).add_(self.zeros[..., None]).view(out, inputs)

    def rows(self, indices: Tensor) -> "Int4Term":
        return Int4Term(self.codes[indices], self.scales[indices], self.zeros[indices])


@dataclass
class GroupInt4:
    """A weight kept as stored: the sum of one or more int4 terms (one for Q4_x, two for Q8_0)."""

    terms: list[Int4Term]

    @property
    def shape(self) -> torch.Size:
        return self.terms[0].codes.shape

    def dequantize(self) -> Tensor:  # [out, in] float32
        weight = self.terms[0].dequantize()
        for term in self.terms[1:]:
            weight += term.dequantize()
        return weight

    def rows(self, indices: Tensor) -> "GroupInt4":
        return GroupInt4([term.rows(indices) for term in self.terms])

    @staticmethod
    def cat(parts: list["GroupInt4"]) -> "GroupInt4":
        """Stack along the output axis (parts with the same number of terms)."""
        return GroupInt4([Int4Term(*(torch.cat([getattr(p.terms[i], f) for p in parts]) for f in ("codes", "scales", "zeros")))
                          for i in range(len(parts[0].terms))])

    @staticmethod
    def from_q4(codes: Tensor, d: Tensor, m: Tensor | None) -> "GroupInt4":
        """Q4_1 (d·q + m) or Q4_0 (d·(q − 8), m None): codes [out, in] in 0..15, d and m [out, in / 32]."""
        zeros = torch.zeros_like(d) if m is None else m + 8 * d
        return GroupInt4([Int4Term(codes, d, zeros)])

    @staticmethod
    def from_q8_0(codes: Tensor, d: Tensor) -> "GroupInt4":
        """Q8_0 (d·q, q in −128..127) exactly as two int4 terms: with u = q + 128 = 16·hi + lo,
        d·q = 16d·(hi − 8) + (d·(lo − 8) + 8d)."""
        unsigned = codes.to(torch.int32) + 128
        high, low = unsigned >> 4, unsigned & 15
        return GroupInt4([Int4Term(high, 16 * d, torch.zeros_like(d)), Int4Term(low, d, 8 * d)])

    @staticmethod
    def quantize(weight: Tensor) -> "GroupInt4":
        """Re-quantize a dense weight [out, in]: per group, scale = (max − min) / 15, zero = min + 8·scale."""
        out_features, in_features = weight.shape
        groups = weight.float().reshape(out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
        low = groups.amin(-1)
        scales = ((groups.amax(-1) - low) / 15).clamp_min(1e-12)
        codes = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
        return GroupInt4([Int4Term(codes.reshape(out_features, in_features), scales, low + 8 * scales)])


class DenseLinear:
    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype):
        self.weight = weight.to(dtype).contiguous()  # [out, in]
        self.bias = None if bias is None else bias.to(dtype)

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8Linear:
    def __init__(self, weight: Tensor, bias: Tensor | None):
        weight = weight.float()
        scales = weight.abs().amax(-1).clamp_min(1e-12) / 127  # [out]
        self.weight = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)  # [out, in]
        self.scales = scales.to(torch.bfloat16)
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


class Int4Linear:
    """x @ W.T for a GroupInt4 weight, one kernel call per term (the terms' outputs summed in fp32)."""

    def __init__(self, weight: GroupInt4, bias: Tensor | None):
        self.packed = [
            (torch.ops.aten._convert_weight_to_int4pack_for_cpu(term.codes.contiguous(), INT4_INNER_K_TILES),
             # [in / group, out, 2] (scale, zero) in bf16, the layout the kernel reads.
             torch.stack([term.scales, term.zeros], -1).transpose(0, 1).contiguous().to(torch.bfloat16))
            for term in weight.terms
        ]
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    @staticmethod
    def supports(shape: tuple[int, int]) -> bool:
        out_features, in_features = shape
        return out_features % 16 == 0 and in_features % (INT4_INNER_K_TILES * 16) == 0

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        outs = [torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, INT4_GROUP_SIZE, scales)
                for packed, scales in self.packed]
        out = outs[0] if len(outs) == 1 else (outs[0].float() + outs[1].float()).to(outs[0].dtype)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def make_linear(weight: Tensor | GroupInt4, bias: Tensor | None, precision: str):
    """A linear layer of `weight` [out, in] in `precision`.

    A stored GroupInt4 weight runs as stored under native, and is dequantized for the other modes;
    int4 falls back to int8 where the kernel cannot take the shape.
    """
    if isinstance(weight, GroupInt4):
        if precision == "native" and Int4Linear.supports(tuple(weight.shape)):
            return Int4Linear(weight, bias)
        weight = weight.dequantize()
    if precision in ("native", "fp32", "bf16"):
        return DenseLinear(weight, bias, compute_dtype(precision))
    if precision == "int4" and Int4Linear.supports(tuple(weight.shape)):
        return Int4Linear(GroupInt4.quantize(weight), bias)
    return Int8Linear(weight, bias)


def as_dense(weight: Tensor | GroupInt4) -> Tensor:
    """A weight as a dense float32 tensor (stored blocks dequantized)."""
    return weight.dequantize() if isinstance(weight, GroupInt4) else weight.float()
