"""Linear layers for each precision mode, behind one call: layer(x) -> x @ W.T + b.

- fp32 / bf16: dense weights in that dtype.
- int8: per-output-channel symmetric int8 weights, bf16 activations, torch's
  `_weight_int8pack_mm` CPU kernel.
- int4: group-wise (32 along the input axis) asymmetric 4-bit weights, bf16
  activations, torch's `_weight_int4pack_mm_for_cpu` kernel. The kernel
  dequantises a group as (q − 8)·scale + zero, so zero = min + 8·scale.

The quantised kernels are fed bf16 activations only: with fp32 activations
they run at under 3 GB/s on this kind of CPU.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

PRECISIONS = ("fp32", "bf16", "int8", "int4")
INT4_GROUP_SIZE = 32
INT4_INNER_K_TILES = 2


def compute_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "fp32" else torch.bfloat16


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
    def __init__(self, weight: Tensor, bias: Tensor | None, group_size: int = INT4_GROUP_SIZE):
        out_features, in_features = weight.shape
        groups = weight.float().reshape(out_features, in_features // group_size, group_size)
        low = groups.amin(-1, keepdim=True)
        scales = ((groups.amax(-1, keepdim=True) - low) / 15).clamp_min(1e-12)
        codes = ((groups - low) / scales).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        zeros = low + 8 * scales
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_INNER_K_TILES)
        # [in / group, out, 2] (scale, zero) in bf16, the layout the kernel reads.
        self.scales_and_zeros = torch.cat([scales, zeros], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.group_size = group_size
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    @staticmethod
    def supports(weight: Tensor, group_size: int = INT4_GROUP_SIZE) -> bool:
        out_features, in_features = weight.shape
        return out_features % 16 == 0 and in_features % group_size == 0 and in_features % (INT4_INNER_K_TILES * 16) == 0

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scales_and_zeros)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


def make_linear(weight: Tensor, bias: Tensor | None, precision: str):
    """A linear layer of `weight` [out, in] in `precision` (int4 falls back to int8 where the shape forbids it)."""
    if precision in ("fp32", "bf16"):
        return DenseLinear(weight, bias, compute_dtype(precision))
    if precision == "int4" and Int4Linear.supports(weight):
        return Int4Linear(weight, bias)
    return Int8Linear(weight, bias)
