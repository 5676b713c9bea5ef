"""GGUF files read as stored, with no transformers model in between.

The `gguf` package reads the file; transformers interprets its metadata (the
model config and the tokenizer, so both equal what transformers would load).
Parsing a GGUF's metadata is slow (~5 s for a 49k-token vocabulary, every
string a Python object), so the first load of a file writes an index to
spectr's cache: the config, the tokenizer, and where each tensor lies in the
file. Later loads read the index and map the tensors straight from the file.

Tensors come out under transformers' names, in transformers' layout:
llama.cpp's converter permutes the rows of Q and K for its RoPE layout, undone
here (whole rows move, so quantized blocks stay as stored). Storage types:
Q4_0, Q4_1 and Q8_0 become `BlockQuantized` weights (kept as stored), F32 / F16 /
BF16 dense, and any other type is dequantized once by the gguf package.
"""

from dataclasses import dataclass
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from spectr.errors import UnsupportedModelError
from spectr.models.quantize import BlockQuantized

log = logging.getLogger(__name__)

INDEX_FORMAT = "spectr-gguf-index-1"
NATIVE_ARCHITECTURES = ("llama", "qwen2")  # GGUF architecture names spectr's forward reads directly
PERMUTED_ARCHITECTURES = ("llama",)  # whose converter permutes Q/K rows
DENSE_TYPES = ("F32", "F16", "BF16")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def cache_root() -> Path:
    """spectr's cache folder: $SPECTR_CACHE_DIR, else ~/.cache/spectr."""
    return Path(os.environ.get("SPECTR_CACHE_DIR") or Path.home() / ".cache" / "spectr")


def transformers_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None for tensors spectr does not read)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_rows(rows: int, heads: int) -> Tensor:
    """The row order that undoes llama.cpp's Q/K permutation: stored row index of each transformers row.

    The converter maps transformers' rows (head, half, i) to (head, i, half); this is its inverse.
    """
    per_half = rows // heads // 2
    return torch.arange(rows).view(heads, per_half, 2).transpose(1, 2).reshape(rows)


@dataclass(frozen=True)
class StoredTensor:
    name: str  # transformers name
    kind: str  # GGML type name: Q4_1, Q8_0, F32, ...
    shape: tuple[int, ...]  # torch order: [out, in] for matrices
    offset: int  # bytes from the start of the file
    nbytes: int


class GGUFModel:
    """A GGUF file's config, tokenizer and tensors (as stored or dequantized), via a cached index."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        index = self._index()
        self.architecture: str = index["architecture"]
        self.config_dict: dict = index["config"]
        self.tokenizer_folder = Path(index["tokenizer_folder"])
        self.tensors = {t["name"]: StoredTensor(**{**t, "shape": tuple(t["shape"])}) for t in index["tensors"]}
        self._file = np.memmap(self.path, dtype=np.uint8, mode="r")

    # -- the index -------------------------------------------------------------------------------
    def _index(self) -> dict:
        stat = self.path.stat()
        identity = {"path": str(self.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        folder = cache_root() / "gguf" / f"{self.path.stem}-{key}"
        index_file = folder / "index.json"
        if index_file.is_file():
            index = json.loads(index_file.read_text())
            if index.get("format") == INDEX_FORMAT and index.get("identity") == identity:
                return index
        index = self._build_index(folder, identity)
        try:
            index_file.write_text(json.dumps(index))
        except OSError as error:  # a read-only cache costs speed, not correctness
            log.warning("could not cache the index of %s (%s); the next load will parse it again", self.path, error)
        return index

    def _build_index(self, folder: Path, identity: dict) -> dict:
        from gguf import GGUFReader
        from transformers import AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        from transformers.utils import logging as hf_logging

        log.info("indexing %s (once; cached in %s)", self.path.name, folder)
        reader = GGUFReader(str(self.path))
        architecture = str(reader.fields["general.architecture"].contents())
        tensors = []
        for tensor in reader.tensors:
            name = transformers_name(tensor.name)
            if name is not None:
                tensors.append({"name": name, "kind": tensor.tensor_type.name,
                                "shape": [int(n) for n in reversed(tensor.shape.tolist())],
                                "offset": int(tensor.data_offset), "nbytes": int(tensor.n_bytes)})
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # transformers' progress bars and notes are not spectr's to print
        hf_logging.disable_progress_bar()
        try:
            config = load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
            tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                      local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        tokenizer_folder = folder / "tokenizer"
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(tokenizer_folder))
        return {"format": INDEX_FORMAT, "identity": identity, "architecture": architecture, "config": config,
                "tokenizer_folder": str(tokenizer_folder), "tensors": tensors}

    # -- what loading needs ----------------------------------------------------------------------
    @functools.cached_property
    def hf_config(self):
        """The model config under transformers' field names, as transformers reads it from the file.

        A transformers config object is built only for a scaled RoPE, whose frequencies come from
        transformers' own functions; otherwise a plain namespace of the same fields does, because
        importing transformers' config classes adds ~3 s to a load.
        """
        config = dict(self.config_dict)
        if config.get("rope_scaling"):
            from transformers import AutoConfig

            return AutoConfig.for_model(config.pop("model_type"), **config)
        rope = {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
        return SimpleNamespace(**{"hidden_act": "silu", "tie_word_embeddings": False, **config},
                               rope_parameters=rope)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_folder), local_files_only=True)

    def _raw(self, tensor: StoredTensor) -> np.ndarray:
        return self._file[tensor.offset : tensor.offset + tensor.nbytes]

    def _row_order(self, name: str) -> Tensor | None:
        if self.architecture not in PERMUTED_ARCHITECTURES:
            return None
        c = self.config_dict
        if ".self_attn.q_proj." in name:
            return unpermute_rows(self.tensors[name].shape[0], c["num_attention_heads"])
        if ".self_attn.k_proj." in name:
            return unpermute_rows(self.tensors[name].shape[0], c.get("num_key_value_heads") or c["num_attention_heads"])
        return None

    @functools.lru_cache(maxsize=1)  # a trained draft asks for the embedding twice (fingerprint, rows)
    def dense(self, name: str) -> Tensor:
        """A tensor dequantized to float32, in transformers' layout (what transformers would load)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        values = dequantize(self._raw(tensor), GGMLQuantizationType[tensor.kind])
        weight = torch.from_numpy(np.array(values, dtype=np.float32)).view(tensor.shape)  # a copy: the map is read-only
        order = self._row_order(name)
        return weight if order is None else weight[order]

    def stored(self, name: str) -> Tensor | BlockQuantized:
        """A tensor as stored: Q4_0 / Q4_1 / Q8_0 as BlockQuantized, F32 / F16 / BF16 dense (float32 values), other
        types dequantized."""
        tensor = self.tensors[name]
        if tensor.kind in DENSE_TYPES or tensor.kind not in ("Q4_0", "Q4_1", "Q8_0") or len(tensor.shape) != 2:
            if tensor.kind not in DENSE_TYPES:
                log.info("%s is stored as %s, which spectr runs dequantized to bf16", name, tensor.kind)
            return self.dense(name)
        rows, columns = tensor.shape
        blocks = self._raw(tensor).reshape(rows, columns // 32, -1)  # [out, in / 32, bytes per block]
        order = self._row_order(name)
        if order is not None:
            blocks = blocks[order.numpy()]
        blocks = torch.from_numpy(np.array(blocks))  # a copy: the map is read-only

        def half(start: int) -> Tensor:  # the f16 at byte `start` of every block, as float32 [out, in / 32]
            return blocks[..., start : start + 2].contiguous().view(torch.float16)[..., 0].float()

        if tensor.kind == "Q8_0":  # d (f16), 32 × int8
            codes = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, columns)
            return BlockQuantized.from_q8_0(codes, half(0))
        packed = blocks[..., 4:] if tensor.kind == "Q4_1" else blocks[..., 2:]  # 16 bytes: 32 nibbles
        # A block's low nibbles are its elements 0..15, the high nibbles 16..31.
        codes = torch.cat([packed & 15, packed >> 4], dim=-1).to(torch.int8).reshape(rows, columns)
        # Q4_1: d (f16), m (f16), 16 bytes; Q4_0: d (f16), 16 bytes.
        return BlockQuantized.from_q4(codes, half(0), half(2) if tensor.kind == "Q4_1" else None)

    def state(self, as_stored: bool) -> dict[str, Tensor | BlockQuantized]:
        """Every tensor by transformers name: as stored, or all dequantized to float32."""
        if self.architecture not in NATIVE_ARCHITECTURES:
            raise UnsupportedModelError(
                f"spectr reads GGUF architectures {', '.join(NATIVE_ARCHITECTURES)} natively; "
                f"this file is '{self.architecture}'")
        read = self.stored if as_stored else self.dense
        return {name: read(name) for name in self.tensors}
