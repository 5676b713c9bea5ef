"""spectr's compiled CPU kernels (kernels.cpp): a block-quantized linear layer and few-query attention.

Both are row-invariant (see kernels.cpp). The library is built on first use
with the machine's C++ compiler for its own CPU (-march=native) and cached
under spectr's cache folder, keyed by the source, the compiler and the CPU, so
a build happens once per machine (~2 s). Where no compiler works, or with
SPECTR_KERNELS=off, `library()` is None and spectr runs on torch's kernels
(faster to set up, but not row-invariant: `spectr check` says so).
"""

import ctypes
import functools
import hashlib
import logging
import os
from pathlib import Path
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
BLOCK = 32

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _cpu_identity() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith("flags")), info[:2000])
    except OSError:
        import platform

        return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def disabled() -> bool:
    """SPECTR_KERNELS=off (or 0 / false / no): run on torch's kernels."""
    return os.environ.get("SPECTR_KERNELS", "").lower() in ("0", "off", "false", "no")


def compiler_version(compiler: str | None = None) -> str | None:
    """`c++ --version` of the compiler the kernels are built with; None where none is found."""
    compiler = compiler or _compiler()
    if compiler is None:
        return None
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout


def build(folder: Path, flags: tuple[str, ...] = FLAGS, compiler: str | None = None) -> Path:
    """Compile kernels.cpp with `flags` into `folder` (once per source, compiler, flags and CPU); the .so's path.
    Raises RuntimeError where it cannot."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    version = compiler_version(compiler)
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, version, " ".join(flags),
                                    _cpu_identity()]).encode()).hexdigest()[:16]
    target = folder / f"spectr-kernels-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(result.stderr.strip()[-2000:])
            os.replace(built, target)  # atomic: a concurrent build never loads a half-written file
    return target


def load(path: Path) -> ctypes.CDLL:
    """A built kernel library, its functions typed."""
    lib = ctypes.CDLL(str(path))
    lib.spectr_block_linear.argtypes = [_ptr, ctypes.c_int, _i64, _i64, _ptr, _i64, _ptr, _ptr, ctypes.c_int]
    lib.spectr_block_linear.restype = None
    lib.spectr_packed_bytes.argtypes = [ctypes.c_int, _i64, _i64]
    lib.spectr_packed_bytes.restype = _i64
    lib.spectr_pack.argtypes = [_ptr, _ptr, ctypes.c_int, _i64, _i64, _ptr]
    lib.spectr_pack.restype = None
    lib.spectr_kernel_path.argtypes = []
    lib.spectr_kernel_path.restype = ctypes.c_char_p
    lib.spectr_attend.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64,
                                  ctypes.c_float, _ptr, _i64, _i64, _i64, _ptr]
    lib.spectr_attend.restype = None
    lib.spectr_decoder_layers.argtypes = [ctypes.c_void_p, _i64, _ptr, _ptr, _ptr, ctypes.c_void_p, _i64, _i64, _i64]
    lib.spectr_decoder_layers.restype = None
    lib.spectr_transposed_keys.argtypes = []
    lib.spectr_transposed_keys.restype = ctypes.c_int
    for name in ("spectr_sparse_most_head_dim", "spectr_sparse_most_group"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = _i64
    return lib


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built if needed; None where they cannot be built (or SPECTR_KERNELS=off)."""
    if disabled():
        return None
    if _compiler() is None:
        log.warning("no C++ compiler found; spectr runs on torch's kernels (slower, not row-invariant)")
        return None
    from spectr.models.gguf import cache_root  # (gguf reads weights into quantize, which uses these kernels)

    try:
        return load(build(cache_root() / "kernels"))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("spectr's kernels could not be built (%s); running on torch's kernels", error)
        return None


def available() -> bool:
    return library() is not None


def source_digest() -> str:
    """A short digest of kernels.cpp: what measured a cost is keyed by (a changed kernel costs otherwise)."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]


def path() -> str | None:
    """The block kernel's path on this machine: "avx512-vnni", "avx2" or "portable"; None without kernels."""
    return None if library() is None else library().spectr_kernel_path().decode()


def pack(codes: Tensor, params: Tensor, bits: int) -> Tensor:
    """A weight in the row layout (codes [n, k / 2] (4-bit) or [n, k] (8-bit) uint8, params [n, 2, P]
    float16, see kernels.cpp) rewritten in the layout this machine's kernel reads (uint8, flat)."""
    n, k = codes.shape[0], codes.shape[1] * (2 if bits == 4 else 1)
    packed = torch.empty(library().spectr_packed_bytes(bits, n, k), dtype=torch.uint8)
    library().spectr_pack(codes.contiguous().data_ptr(), params.contiguous().data_ptr(), bits, n, k,
                          packed.data_ptr())
    return packed


def block_linear(packed: Tensor, bits: int, n: int, k: int, x: Tensor, bias: Tensor | None,
                 activation_bits: int = 16) -> Tensor:
    """x [..., k] float32 @ W.T (+ bias) for W [n, k] in 32-blocks, packed by `pack`. Returns float32 [..., n]."""
    flat = x.reshape(-1, k)
    if flat.dtype != torch.float32 or not flat.is_contiguous():
        flat = flat.float().contiguous()
    out = torch.empty(flat.shape[0], n, dtype=torch.float32)
    library().spectr_block_linear(packed.data_ptr(), bits, n, k, flat.data_ptr(), flat.shape[0],
                                  None if bias is None else bias.data_ptr(), out.data_ptr(), activation_bits)
    return out.view(*x.shape[:-1], n)


def transposed_keys() -> bool:
    """Whether this machine's attention kernel also reads the keys transposed (a cache keeps both then)."""
    return library() is not None and bool(library().spectr_transposed_keys())


def sparse_supported(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel's SparQ attention takes this shape (else torch's reference runs it)."""
    return (library() is not None and head_dim <= library().spectr_sparse_most_head_dim()
            and heads // kv_heads <= library().spectr_sparse_most_group())


def tile_keys(keys: Tensor) -> Tensor:
    """Keys [..., capacity, E] transposed by tiles of 16 slots: [..., ceil(capacity / 16), E, 16], contiguous."""
    *lead, capacity, head_dim = keys.shape
    tiles = -(-capacity // 16)
    padded = torch.zeros(*lead, tiles * 16, head_dim, dtype=keys.dtype)
    padded[..., :capacity, :] = keys
    return padded.view(*lead, tiles, 16, head_dim).transpose(-1, -2).contiguous()


def attend(queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor, slots: int,
           keys_t: Tensor | None = None, sparse: "Sparse | None" = None) -> Tensor:
    """Row-invariant attention. queries [B, T, H, E] float32; keys, values: a layer's whole cache
    [B, G, capacity, E] float32 (slots 0..slots-1 in use); keys_t: the same keys transposed by tiles of 16
    slots, [B, G, tiles, E, 16] (`tile_keys`; read where transposed_keys(), optional); mask [B, T, slots]
    bool. sparse: SparQ attention instead (a draft's approximation; attention.sparq_attend is its reference).
    Returns [B, T, H, E]."""
    batch, tokens, heads, head_dim = queries.shape
    queries = queries.contiguous()
    mask = mask.contiguous()
    out = torch.empty_like(queries)
    rank, keep, dense_from, means = sparse.arguments() if sparse is not None else (0, 0, 0, None)
    library().spectr_attend(queries.data_ptr(), keys.data_ptr(), None if keys_t is None else keys_t.data_ptr(),
                            values.data_ptr(), mask.data_ptr(), batch, tokens, heads, keys.shape[1], head_dim,
                            keys.shape[2], slots, head_dim ** -0.5, out.data_ptr(), rank, keep, dense_from,
                            None if means is None else means.data_ptr())
    return out


@dataclass
class Sparse:
    """SparQ attention as the kernel takes it: attention.SparQ's rank and keep, the first slot attended
    exactly whatever its score, and value_mean float32 contiguous, the mean of the values before it
    ([B, G, E] for one layer, or [layers, B, G, E] for a DecoderStack)."""

    rank: int
    keep: int
    dense_from: int
    value_mean: Tensor

    def arguments(self, first_layer: int = 0) -> tuple[int, int, int, Tensor]:
        means = self.value_mean if self.value_mean.ndim == 3 else self.value_mean[first_layer]
        return self.rank, self.keep, self.dense_from, means


class _BlockWeight(ctypes.Structure):
    _fields_ = [("packed", _ptr), ("bias", _ptr), ("bits", _i64), ("n", _i64), ("k", _i64), ("activation_bits", _i64)]


class _DecoderLayer(ctypes.Structure):
    _fields_ = [("attention_norm", _ptr), ("mlp_norm", _ptr), ("qkv", _BlockWeight), ("output", _BlockWeight),
                ("gate_up", _BlockWeight), ("down", _BlockWeight), ("hidden", _i64), ("heads", _i64),
                ("kv_heads", _i64), ("head_dim", _i64), ("ffn", _i64), ("eps", ctypes.c_float)]


class DecoderLayer:
    """One Llama decoder layer as the kernel runs it (norms, block linears, RoPE, cache write, attention,
    SiLU-gated MLP), described for DecoderStack, which runs the layers.

    The tensors are kept here so the pointers the kernel holds stay valid.
    """

    def __init__(self, attention_norm: Tensor, mlp_norm: Tensor, qkv, output, gate_up, down, *,
                 heads: int, kv_heads: int, head_dim: int, eps: float):
        self._tensors = [attention_norm.float().contiguous(), mlp_norm.float().contiguous()]
        weights = []
        for linear in (qkv, output, gate_up, down):
            bias = None if linear.bias is None else linear.bias.float().contiguous()
            self._tensors += [linear.packed, bias]
            weights.append(_BlockWeight(linear.packed.data_ptr(), None if bias is None else bias.data_ptr(),
                                        linear.bits, linear.out_features, linear.in_features,
                                        linear.activation_bits))
        hidden = self._tensors[0].shape[0]
        self.descriptor = _DecoderLayer(self._tensors[0].data_ptr(), self._tensors[1].data_ptr(), *weights,
                                        hidden, heads, kv_heads, head_dim, weights[2].n // 2, eps)

    @staticmethod
    def supports(hidden: int, head_dim: int, linears) -> bool:
        from spectr.models.quantize import BlockLinear

        return (available() and hidden % 8 == 0 and head_dim % 8 == 0
                and all(isinstance(linear, BlockLinear) for linear in linears))


class _Segment(ctypes.Structure):  # kernels.cpp's Segment
    _fields_ = [("tokens", _i64), ("keys", _ptr), ("keys_t", _ptr), ("values", _ptr), ("layer_stride", _i64),
                ("layer_stride_t", _i64), ("capacity", _i64), ("start", _i64), ("mask", _ptr), ("dense_from", _i64),
                ("value_means", _ptr), ("mean_stride", _i64)]


@dataclass
class Segment:
    """One sequence's new tokens in a DecoderStack pass: `tokens` consecutive rows of x attending row `row`
    of a cache, keys and values [layers, B, G, capacity, E] float32 contiguous (keys_t: transposed by tiles,
    [layers, B, G, tiles, E, 16], or None); they are written at slots start..start+tokens-1 and see the
    slots mask [tokens, start + tokens] (bool, contiguous) allows. dense_from > 0, with value_means
    [layers, B, G, E] float32 contiguous: SparQ attention over the slots before it (the pass's Sparse)."""

    tokens: int
    keys: Tensor
    values: Tensor
    keys_t: Tensor | None
    row: int
    start: int
    mask: Tensor
    dense_from: int = 0
    value_means: Tensor | None = None

    def described(self, first: int) -> _Segment:
        """As the kernel takes it, from layer `first` of the cache on."""
        keys_t, means = self.keys_t, self.value_means
        return _Segment(self.tokens, self.keys[first, self.row].data_ptr(),
                        None if keys_t is None else keys_t[first, self.row].data_ptr(),
                        self.values[first, self.row].data_ptr(), self.keys.stride(0),
                        0 if keys_t is None else keys_t.stride(0), self.keys.shape[3], self.start,
                        self.mask.data_ptr(), self.dense_from if means is not None else 0,
                        None if means is None else means[first, self.row].data_ptr(),
                        0 if means is None else means.stride(0))


class DecoderStack:
    """A model's decoder layers run by one kernel call for a whole span of them (one parallel region, one
    Python call a forward instead of one a layer)."""

    def __init__(self, layers: list[DecoderLayer]):
        self.layers = layers  # keeps their tensors, and so the descriptors' pointers, alive
        self.descriptors = (_DecoderLayer * len(layers))(*(layer.descriptor for layer in layers))

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, segments: list[Segment], first: int = 0,
                 count: int | None = None, sparse: tuple[int, int] = (0, 0)) -> None:
        """Layers first..first+count-1 over x [..., rows, D] float32 contiguous (the segments' tokens, segment by
        segment), updated in place; cos, sin [..., rows, E] their rotary tables, contiguous; sparse: SparQ's
        (rank, keep) for the segments with a dense_from (a draft's attention)."""
        count = len(self.layers) - first if count is None else count
        if sum(segment.tokens for segment in segments) * x.shape[-1] != x.numel():
            raise ValueError(f"x {tuple(x.shape)} is not the segments' {sum(s.tokens for s in segments)} rows")
        described = (_Segment * len(segments))(*(segment.described(first) for segment in segments))
        library().spectr_decoder_layers(ctypes.byref(self.descriptors, first * ctypes.sizeof(_DecoderLayer)), count,
                                        x.data_ptr(), cos.data_ptr(), sin.data_ptr(), described, len(segments),
                                        *sparse)
