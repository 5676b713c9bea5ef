"""Linear layers for each precision mode, behind one call: layer(x) -> x @ W.T + b.

- native: the weights as the file stores them (`BlockQuantized`: GGUF's Q4_0,
  Q4_1 and Q8_0 blocks) on spectr's own kernel (`kernels.cpp`), which reads
  the blocks as stored, takes float32 activations and is row-invariant; dense
  tensors run in bf16. A transformers folder is dense, so native is bf16 there.
- fp32 / bf16: dense weights in that dtype.
- int8: per-output-channel symmetric int8 weights, bf16 activations, torch's
  `_weight_int8pack_mm` CPU kernel.
- int4: group-wise (32 along the input axis) asymmetric 4-bit weights,
  re-quantized from the dense weights, on the same kernel as native.

Where spectr's kernels cannot be built (no compiler), block weights run on
torch's group-32 int4 kernel (`_weight_int4pack_mm_for_cpu`), which
dequantises a group as (q − 8)·scale + zero with bf16 scales and activations;
Q8_0 then runs exactly as two int4 halves (`BlockQuantized.int4_terms`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from spectr.errors import InvalidInputError
from spectr.models import kernels
from spectr.precisions import STORED_ACTIVATION_BITS

BLOCK_SIZE = 32  # inputs per quantization block (GGUF's Q4_0 / Q4_1 / Q8_0, spectr's int4)
INT4_INNER_K_TILES = 2


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype activations flow in: float32 on spectr's kernels (native modes, int4) and in fp32 mode."""
    if precision == "fp32" or ((precision in STORED_ACTIVATION_BITS or precision == "int4") and kernels.available()):
        return torch.float32
    return torch.bfloat16


@dataclass
class BlockQuantized:
    """A weight [out, in] kept in blocks of 32 inputs, as a file stores it: W = scale·q + offset per block.

    4-bit kinds (Q4_0, Q4_1, spectr's int4) have codes q in 0..15; 8-bit (Q8_0) in −128..127.
    """

    codes: Tensor  # [out, in] int8
    scales: Tensor  # [out, in / 32] float32
    offsets: Tensor  # [out, in / 32] float32
    bits: int  # 4 or 8

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> Tensor:  # [out, in] float32
        out, inputs = self.codes.shape
        blocks = self.codes.float().view(out, -1, BLOCK_SIZE)
        return blocks.mul_(self.scales[..., None]).add_(self.offsets[..., None]).view(out, inputs)

    def rows(self, indices: Tensor) -> "BlockQuantized":
        return BlockQuantized(self.codes[indices], self.scales[indices], self.offsets[indices], self.bits)

    @staticmethod
    def cat(parts: list["BlockQuantized"]) -> "BlockQuantized":
        """Stack along the output axis (parts of the same bit width)."""
        return BlockQuantized(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scales", "offsets")),
                              parts[0].bits)

    @staticmethod
    def from_q4(codes: Tensor, d: Tensor, m: Tensor | None) -> "BlockQuantized":
        """Q4_1 (d·q + m) or Q4_0 (d·(q − 8), m None): codes [out, in] in 0..15, d and m [out, in / 32]."""
        return BlockQuantized(codes.to(torch.int8), d, -8 * d if m is None else m, 4)

    @staticmethod
    def from_q8_0(codes: Tensor, d: Tensor) -> "BlockQuantized":
        """Q8_0 (d·q): codes [out, in] int8, d [out, in / 32]."""
        return BlockQuantized(codes.to(torch.int8), d, torch.zeros_like(d), 8)

    @staticmethod
    def quantize(weight: Tensor) -> "BlockQuantized":
        """Re-quantize a dense weight [out, in] to 4 bits: per block, scale = (max − min) / 15, offset = min."""
        out_features, in_features = weight.shape
        blocks = weight.float().reshape(out_features, in_features // BLOCK_SIZE, BLOCK_SIZE)
        # Scales and offsets in float16, as a file would store them (and spectr's kernel reads them).
        low = blocks.amin(-1).half().float()
        scales = ((blocks.amax(-1) - low) / 15).half().float()
        if not (scales.isfinite().all() and low.isfinite().all()):
            raise InvalidInputError("weights beyond float16's range cannot be quantized to 4 bits")
        steps = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = ((blocks - low[..., None]) / steps[..., None]).round().clamp(0, 15).to(torch.int8)
        return BlockQuantized(codes.reshape(out_features, in_features), scales, low, 4)

    def int4_terms(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The weight as a sum of (codes int32 in 0..15, scales, zeros) terms of torch's int4 kernel,
        W = (codes − 8)·scales + zeros: one term at 4 bits; two at 8 bits, exactly: with
        u = q + 128 = 16·hi + lo, d·q = 16d·(hi − 8) + (d·(lo − 8) + 8d)."""
        codes = self.codes.to(torch.int32)
        if self.bits == 4:
            return [(codes, self.scales, self.offsets + 8 * self.scales)]
        unsigned = codes + 128
        d = self.scales
        return [(unsigned >> 4, 16 * d, torch.zeros_like(d)), (unsigned & 15, d, 8 * d)]


class BlockLinear:
    """x @ W.T (+ b) for a BlockQuantized weight on spectr's kernel: float32 in and out, row-invariant."""

    def __init__(self, weight: BlockQuantized, bias: Tensor | None, activation_bits: int = 16):
        out_features, in_features = weight.shape
        self.activation_bits = activation_bits
        codes = weight.codes.view(out_features, in_features // BLOCK_SIZE, 2, BLOCK_SIZE // 2)
        if weight.bits == 4:  # GGUF's layout: byte j of a block holds input j (low nibble) and j + 16 (high)
            codes = (codes[:, :, 0] | (codes[:, :, 1] << 4))
        codes = codes.reshape(out_features, -1).view(torch.uint8).contiguous()
        # [out, 2, P]: each row's block scales, then its offsets, zero-padded to whole groups of 8 blocks.
        # Half precision, as GGUF stores them: a quarter of a 4-bit row's bytes instead of two fifths.
        padded = -(-in_features // BLOCK_SIZE // 8) * 8
        params = torch.zeros(out_features, 2, padded, dtype=torch.float16)
        params[:, 0, : in_features // BLOCK_SIZE] = weight.scales
        params[:, 1, : in_features // BLOCK_SIZE] = weight.offsets
        if not torch.equal(params[:, :, : in_features // BLOCK_SIZE].float(),
                           torch.stack([weight.scales, weight.offsets], 1).float()):
            raise InvalidInputError("block scales and offsets must be exact in float16 (as GGUF stores them)")
        self.bits, self.out_features, self.in_features = weight.bits, out_features, in_features
        self.packed = kernels.pack(codes, params, weight.bits)  # the layout this machine's kernel reads
        self.bias = None if bias is None else bias.float().contiguous()

    @staticmethod
    def supports(shape: tuple[int, int]) -> bool:
        return kernels.available() and shape[1] % BLOCK_SIZE == 0

    def __call__(self, x: Tensor) -> Tensor:
        return kernels.block_linear(self.packed, self.bits, self.out_features, self.in_features, x, self.bias,
                                    self.activation_bits)


class DenseLinear:
    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype):
        self.weight = weight.to(dtype).contiguous()  # [out, in]
        self.bias = None if bias is None else bias.to(dtype)

    def __call__(self, x: Tensor) -> Tensor:
        # Dense weights under native stay bf16 while activations flow in float32.
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class Int8Linear:
    def __init__(self, weight: Tensor, bias: Tensor | None):
        weight = weight.float()
        scales = weight.abs().amax(-1).clamp_min(1e-12) / 127  # [out]
        self.weight = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)  # [out, in]
        self.scales = scales.to(torch.bfloat16)
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return (out if self.bias is None else out + self.bias).to(x.dtype)


class Int4Linear:
    """x @ W.T for a BlockQuantized weight on torch's int4 kernel (bf16), one call per term (summed in fp32)."""

    def __init__(self, weight: BlockQuantized, bias: Tensor | None):
        self.packed = [
            (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INT4_INNER_K_TILES),
             # [in / group, out, 2] (scale, zero) in bf16, the layout the kernel reads.
             torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(torch.bfloat16))
            for codes, scales, zeros in weight.int4_terms()
        ]
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    @staticmethod
    def supports(shape: tuple[int, int]) -> bool:
        out_features, in_features = shape
        return out_features % 16 == 0 and in_features % (INT4_INNER_K_TILES * 16) == 0

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        outs = [torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, BLOCK_SIZE, scales)
                for packed, scales in self.packed]
        out = outs[0] if len(outs) == 1 else (outs[0].float() + outs[1].float()).to(outs[0].dtype)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return (out if self.bias is None else out + self.bias).to(x.dtype)


def make_linear(weight: Tensor | BlockQuantized, bias: Tensor | None, precision: str):
    """A linear layer of `weight` [out, in] in `precision`.

    A stored BlockQuantized weight runs as stored under native, and is dequantized for the other
    modes; int4 falls back to int8 where no int4 kernel takes the shape.
    """
    if isinstance(weight, BlockQuantized):
        if precision in STORED_ACTIVATION_BITS:
            if BlockLinear.supports(tuple(weight.shape)):
                return BlockLinear(weight, bias, STORED_ACTIVATION_BITS[precision])
            if Int4Linear.supports(tuple(weight.shape)):
                return Int4Linear(weight, bias)
        weight = weight.dequantize()
    if precision in ("fp32", "bf16") or precision in STORED_ACTIVATION_BITS:
        return DenseLinear(weight, bias, torch.float32 if precision == "fp32" else torch.bfloat16)
    if precision == "int4":
        if BlockLinear.supports(tuple(weight.shape)):
            return BlockLinear(BlockQuantized.quantize(weight), bias)
        if Int4Linear.supports(tuple(weight.shape)):
            return Int4Linear(BlockQuantized.quantize(weight), bias)
    return Int8Linear(weight, bias)


def as_dense(weight: Tensor | BlockQuantized) -> Tensor:
    """A weight as a dense float32 tensor (stored blocks dequantized)."""
    return weight.dequantize() if isinstance(weight, BlockQuantized) else weight.float()
