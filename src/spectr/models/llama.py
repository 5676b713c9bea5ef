"""spectr's own forward for Llama-family models (Llama, SmolLM2, Mistral, Qwen2).

A lean, gpt-fast-style forward over a static KV cache: tokens at explicit
positions, attending where an explicit boolean mask allows, so a whole draft
tree is verified in one pass. transformers stays the source of configs,
weights and the rotary frequencies (with the config's scaling), and the
reference this forward is tested against.

Shapes: B sequences, T new tokens, S = cache.length + T attended slots,
D hidden size, H query heads, G key/value heads, E head dim, V vocabulary.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from spectr.errors import ContextOverflowError, InvalidInputError
from spectr.models import kernels
from spectr.models.attention import FEW_QUERIES, SparQ, attend, sparq_attend
from spectr.models.base import ForwardOutput, register_forward
from spectr.models.cache import KVCache
from spectr.models.config import LLAMA_FAMILY, ModelConfig
from spectr.models.quantize import BlockQuantized, as_dense, compute_dtype, make_linear
from spectr.precisions import PRECISIONS


# A causal run longer than this (a prompt) goes through in runs of this many tokens: a 4k-token prompt of
# the default target prefills at 505 tok/s in runs of 512 against 321 in one (its attention's mask and
# scores grow with the square of the run), and a long prompt does not hold the machine in one call.
PREFILL_CHUNK = 512
_NO_ROWS = torch.tensor([], dtype=torch.long)


@dataclass
class _Layer:
    attention_norm: Tensor  # [D]
    qkv: object  # D -> (H + 2G)·E
    output: object  # H·E -> D
    mlp_norm: Tensor  # [D]
    gate_up: object  # D -> 2·F
    down: object  # F -> D
    fused: object = None  # the layer as the kernel runs it (kernels.DecoderLayer, run by a DecoderStack), where it can


def _stack(weights: list[Tensor | BlockQuantized]) -> Tensor | BlockQuantized:
    """Fuse weights along the output axis, as stored when they are stored alike."""
    if all(isinstance(w, Tensor) for w in weights):
        return torch.cat(weights)
    if all(isinstance(w, BlockQuantized) and w.bits == weights[0].bits for w in weights):
        return BlockQuantized.cat(weights)
    return torch.cat([as_dense(w) for w in weights])


def _rows(weight: Tensor | BlockQuantized, indices: Tensor) -> Tensor | BlockQuantized:
    return weight.rows(indices) if isinstance(weight, BlockQuantized) else weight[indices]


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # As transformers: normalise in fp32, cast back, then scale.
    normalized = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in transformers' half-split convention over the last axis, x [..., E] with cos/sin broadcasting
    to it ([B, heads, T, E] with [B, 1, T, E], or [B, T, heads, E] with [B, T, 1, E])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotary_tables(hf_config, context_length: int) -> tuple[Tensor, Tensor]:
    """cos, sin [context, head_dim] float32, as transformers' rotary embedding computes them (with its scaling).

    The frequencies of scaled RoPE types come from transformers' own init functions; importing its
    Llama modelling code instead would add ~1.5 s to every load.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = hf_config.rope_parameters
    if rope["rope_type"] == "default":
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config)
    freqs = torch.arange(context_length, dtype=torch.float)[:, None] * inv_freq.float()  # [context, E / 2]
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * scaling).contiguous(), (angles.sin() * scaling).contiguous()



def causal_mask(cache_length: int, num_new: int) -> Tensor:
    """[T, S] bool: new token i sees every cached slot and new tokens 0..i."""
    new = torch.ones(num_new, num_new, dtype=torch.bool).tril()
    return torch.cat([torch.ones(num_new, cache_length, dtype=torch.bool), new], dim=-1)


class LlamaForward:
    """forward(tokens, positions, cache, attention_mask) -> logits, over weights in one precision mode."""

    backend = "spectr"
    supports_skip = True  # forward(skip=...) leaves layers out (self-speculative drafts)
    supports_sparse = True  # forward(sparse=...) attends by SparQ (self-drafts, the approximate mode)
    captures_layers = True  # forward(capture=...) returns chosen layers' outputs

    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, Tensor],
        rotary: tuple[Tensor, Tensor],
        precision: str,
        vocab_subset: Tensor | None = None,
    ):
        if precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
        self.config = config
        self.precision = precision
        self.dtype = compute_dtype(precision)
        self.cos, self.sin = rotary  # [context, E] float32 each
        c = config

        def linear(prefix: str, *names: str):
            weights = [state[f"{prefix}.{name}.weight"] for name in names]
            biases = [state.get(f"{prefix}.{name}.bias") for name in names]
            if all(b is None for b in biases):
                bias = None
            else:
                bias = torch.cat([b if b is not None else torch.zeros(w.shape[0]) for w, b in zip(weights, biases)])
            return make_linear(_stack(weights), bias, precision)

        self.layers = [
            _Layer(
                attention_norm=state[f"model.layers.{i}.input_layernorm.weight"].to(self.dtype),
                qkv=linear(f"model.layers.{i}.self_attn", "q_proj", "k_proj", "v_proj"),
                output=linear(f"model.layers.{i}.self_attn", "o_proj"),
                mlp_norm=state[f"model.layers.{i}.post_attention_layernorm.weight"].to(self.dtype),
                gate_up=linear(f"model.layers.{i}.mlp", "gate_proj", "up_proj"),
                down=linear(f"model.layers.{i}.mlp", "down_proj"),
            )
            for i in range(c.num_layers)
        ]
        embedding = state["model.embed_tokens.weight"]
        # On spectr's kernels a stored embedding stays stored: a step dequantizes only its tokens' rows.
        self.embedding = (embedding if isinstance(embedding, BlockQuantized) and self.dtype == torch.float32
                          else as_dense(embedding).to(self.dtype))  # [V, D]
        self.norm = state["model.norm.weight"].to(self.dtype)
        head = state["model.embed_tokens.weight"] if c.tie_word_embeddings else state["lm_head.weight"]
        # A draft may predict over a subset of the vocabulary only: logits elsewhere are −inf, so its
        # distribution is zero there (still exact, and a much smaller head).
        self.vocab_subset = vocab_subset
        self.head = make_linear(head if vocab_subset is None else _rows(head, vocab_subset), None, precision)
        # An EAGLE-style draft head reads the target's feature with each token: its input is
        # fc([feature; embedding]) instead of the embedding alone.
        fc = state.get("model.fc.weight")
        self.feature_projection = None if fc is None else make_linear(fc, state.get("model.fc.bias"), precision)
        self.input_norms = [state[f"model.{name}_norm.weight"].to(self.dtype) if f"model.{name}_norm.weight" in state
                            else None for name in ("feature", "embedding")]
        # A fused-feature (EAGLE-3-style) head makes its feature from several target layers: `fuse_features`.
        fuse = state.get("model.fuse.weight")
        self.fusion = None if fuse is None else make_linear(fuse, None, precision)
        self.layer_norms = None if fuse is None else state["model.layer_norms.weight"].to(self.dtype)  # [n, D]
        self.qkv_sizes = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        # Few new tokens attend through spectr's row-invariant kernel where it is built (float32 caches).
        self.kernel_attention = kernels.available() and self.dtype == torch.float32 and c.head_dim % 8 == 0
        # SparQ on the kernel too where its shape fits (else torch's reference runs it).
        self.sparse_on_kernel = self.kernel_attention and kernels.sparse_supported(c.num_heads, c.num_kv_heads,
                                                                                   c.head_dim)
        # Where every linear runs on spectr's block kernel, the layers run in one kernel call (DecoderStack).
        self.fused = self.kernel_attention and all(kernels.DecoderLayer.supports(c.hidden_size, c.head_dim, (
            layer.qkv, layer.output, layer.gate_up, layer.down)) for layer in self.layers)
        for layer in self.layers if self.fused else ():
            layer.fused = kernels.DecoderLayer(
                layer.attention_norm, layer.mlp_norm, layer.qkv, layer.output, layer.gate_up, layer.down,
                heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim, eps=c.rms_norm_eps)
        self._stack = None  # all of them as one kernel call: _fused_stack

    def _chunked(self, tokens, positions, cache, logit_indices, features, capture, skip, sparse) -> ForwardOutput:
        """A long causal run (a prompt) as consecutive runs of PREFILL_CHUNK tokens, then the head on the rows
        asked for (a row's logits are the same bits either way)."""
        outs = []
        for start in range(0, tokens.shape[1], PREFILL_CHUNK):
            part = slice(start, start + PREFILL_CHUNK)
            outs.append(self.forward(tokens[:, part], positions[:, part], cache, logit_indices=_NO_ROWS,
                                     features=None if features is None else features[:, part], capture=capture,
                                     skip=skip, sparse=sparse))
        hidden = torch.cat([out.hidden for out in outs], 1)
        layers = torch.cat([out.layers for out in outs], 1) if capture else None
        return ForwardOutput(logits=self.logits(hidden if logit_indices is None else hidden[:, logit_indices]),
                             hidden=hidden, layers=layers)

    def _fused_stack(self) -> "kernels.DecoderStack":
        """The layers as one kernel call for a span of them (one Python call a forward), rebuilt if
        self.layers has changed since."""
        if self._stack is None or self._stack.layers != [layer.fused for layer in self.layers]:
            self._stack = kernels.DecoderStack([layer.fused for layer in self.layers])
        return self._stack

    def embed(self, tokens: Tensor) -> Tensor:
        """The input embeddings of tokens [...] -> [..., D]."""
        if isinstance(self.embedding, BlockQuantized):
            return self.embedding.rows(tokens.reshape(-1)).dequantize().view(*tokens.shape, -1)
        return self.embedding[tokens]

    @torch.inference_mode()
    def fuse_features(self, layers: Tensor) -> Tensor:
        """A fused-feature head's feature from the target's layers [..., n, D] -> [..., D]."""
        if self.fusion is None:
            raise InvalidInputError("this model does not fuse target layers into features")
        if layers.shape[-2:] != self.layer_norms.shape:
            raise InvalidInputError(f"the fusion reads {tuple(self.layer_norms.shape)} layers, got {tuple(layers.shape)}")
        normed = _rms_norm(layers.to(self.dtype), self.layer_norms, self.config.rms_norm_eps)
        return self.fusion(normed.flatten(-2))

    def new_cache(self, capacity: int | None = None, batch: int = 1) -> KVCache:
        """An empty cache for `batch` sequences of up to `capacity` tokens (default: the context length)."""
        capacity = self.config.context_length if capacity is None else capacity
        if not 0 < capacity <= self.config.context_length:
            raise ContextOverflowError(
                f"a cache of {capacity} tokens was asked for; the model's context is {self.config.context_length}"
            )
        c = self.config
        return KVCache(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim, self.dtype,
                       transposed=self.kernel_attention and kernels.transposed_keys())

    def _check(self, tokens: Tensor, positions: Tensor, cache: KVCache, mask: Tensor) -> None:
        if tokens.ndim != 2 or tokens.dtype != torch.long:
            raise InvalidInputError(f"tokens must be a LongTensor [batch, new], got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise InvalidInputError(f"token ids must lie in [0, {self.config.vocab_size})")
        if positions.shape != tokens.shape:
            raise InvalidInputError(f"positions {tuple(positions.shape)} must match tokens {tuple(tokens.shape)}")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.config.context_length):
            raise ContextOverflowError(
                f"position {int(positions.max())} is beyond the model's context of {self.config.context_length} tokens"
            )
        if cache.keys.shape[1] != tokens.shape[0]:
            raise InvalidInputError(f"the cache holds {cache.keys.shape[1]} sequences; tokens have {tokens.shape[0]}")
        span = cache.length + tokens.shape[1]
        if mask.shape[-2:] != (tokens.shape[1], span) or mask.dtype != torch.bool:
            raise InvalidInputError(
                f"attention_mask must be bool [new, cached + new] = [{tokens.shape[1]}, {span}], "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if not bool(mask[..., cache.length :].diagonal(dim1=-2, dim2=-1).all()):
            raise InvalidInputError("attention_mask must let every new token attend to itself")

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        attention_mask: Tensor | None = None,
        logit_indices: Tensor | None = None,
        features: Tensor | None = None,
        capture: tuple[int, ...] = (),
        skip: frozenset[int] = frozenset(),
        sparse: SparQ | None = None,
    ) -> ForwardOutput:
        """Run tokens [B, T] at positions [B, T] (or [T]) over `cache`, writing their keys and values.

        attention_mask: bool [T, S] or [B, T, S], True where a new token may attend
        (S = cache.length + T); default causal. logit_indices: which of the T
        tokens need logits (all by default; the LM head is a large share of the cost).
        features: [B, T, D], only for a draft head that reads the target's features.
        capture: layers whose output (the residual stream after them) to return as `layers`.
        skip: layers not to run (a cheaper model for self-speculative drafting: the residual stream passes
        them unchanged, and their cache slots for these tokens are left as they were).
        sparse: SparQ attention over the older slots (an approximation, for a self-speculative draft).
        """
        batch, num_new = tokens.shape if tokens.ndim == 2 else (0, 0)
        positions = positions.expand(batch, -1) if positions.ndim == 1 else positions
        if attention_mask is None and num_new > PREFILL_CHUNK:
            return self._chunked(tokens, positions, cache, logit_indices, features, capture, skip, sparse)
        mask = causal_mask(cache.length, num_new) if attention_mask is None else attention_mask
        self._check(tokens, positions, cache, mask)
        if any(not 0 <= i < self.config.num_layers for i in capture):
            raise InvalidInputError(f"capture names layers {capture}; this model has {self.config.num_layers}")
        if any(not 0 <= i < self.config.num_layers for i in skip) or set(capture) & set(skip):
            raise InvalidInputError(f"skip names layers {sorted(skip)}: each must be one of the model's "
                                    f"{self.config.num_layers} and not a captured one {capture}")
        captured = {}
        start = cache.reserve(num_new)
        c = self.config
        dense_from = 0 if sparse is None else sparse.dense_from(start)
        if sparse is not None and dense_from <= sparse.keep:
            dense_from = 0  # no more older slots than SparQ keeps: plain attention is the same
        means = cache.value_means(dense_from) if dense_from else None  # [layers, B, G, E]
        mask = mask.expand(batch, -1, -1)  # [B, T, S]
        on_kernel = self.kernel_attention and num_new <= FEW_QUERIES and (means is None or self.sparse_on_kernel)
        # The kernel takes queries as [B, T, H, E]; torch's path as [B, H, T, E].
        cos = self.cos[positions].to(self.dtype)[:, :, None] if on_kernel else self.cos[positions].to(self.dtype)[:, None]
        sin = self.sin[positions].to(self.dtype)[:, :, None] if on_kernel else self.sin[positions].to(self.dtype)[:, None]
        mask = mask.contiguous() if on_kernel else mask[:, None]  # [B, T, S] or [B, 1, T, S]
        x = self.embed(tokens)  # [B, T, D]
        if self.feature_projection is not None:
            if features is None or features.shape != x.shape:
                raise InvalidInputError(
                    f"this draft head needs features {tuple(x.shape)} with its tokens, "
                    f"got {None if features is None else tuple(features.shape)}")
            inputs = [features.to(self.dtype), x]
            inputs = [v if w is None else _rms_norm(v, w, c.rms_norm_eps) for v, w in zip(inputs, self.input_norms)]
            x = self.feature_projection(torch.cat(inputs, -1))
        elif features is not None:
            raise InvalidInputError("features are only read by a draft head that was trained on them")
        fused = on_kernel and self.fused
        if fused:
            x = x.float().contiguous()  # updated in place by the kernel
            cos, sin = cos[:, :, 0].contiguous(), sin[:, :, 0].contiguous()  # [B, T, E]
            stack = self._fused_stack()
            segments = [kernels.Segment(num_new, cache.keys, cache.values, cache.keys_t, b, start, mask[b],
                                        dense_from, means) for b in range(batch)]
            sparsely = (0, 0) if means is None else (sparse.rank, sparse.keep)
            for first, count in _spans(len(self.layers), set(capture), skip):
                stack(x, cos, sin, segments, first, count, sparsely)
                if first + count - 1 in capture:
                    captured[first + count - 1] = x.clone()
        for index, layer in enumerate(() if fused else self.layers):
            if index in skip:
                continue
            q, k, v = layer.qkv(_rms_norm(x, layer.attention_norm, c.rms_norm_eps)).split(self.qkv_sizes, -1)
            if on_kernel:
                q = _rotate(q.view(batch, num_new, c.num_heads, c.head_dim), cos, sin)  # [B, T, H, E]
                k = _rotate(k.view(batch, num_new, c.num_kv_heads, c.head_dim), cos, sin)
                v = v.view(batch, num_new, c.num_kv_heads, c.head_dim)
                cache.write(index, start, k.transpose(1, 2), v.transpose(1, 2))
                attended = kernels.attend(q, cache.keys[index], cache.values[index], mask, start + num_new,
                                          None if cache.keys_t is None else cache.keys_t[index],
                                          None if means is None else kernels.Sparse(sparse.rank, sparse.keep,
                                                                                    dense_from, means[index]))
                x = x + layer.output(attended.view(batch, num_new, -1))
                gate, up = layer.gate_up(_rms_norm(x, layer.mlp_norm, c.rms_norm_eps)).chunk(2, -1)
                x = x + layer.down(F.silu(gate) * up)
                if index in capture:
                    captured[index] = x
                continue
            q = _rotate(q.view(batch, num_new, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)
            k = _rotate(k.view(batch, num_new, c.num_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
            v = v.view(batch, num_new, c.num_kv_heads, c.head_dim).transpose(1, 2)
            keys, values = cache.write(index, start, k, v)  # [B, G, S, E]
            attended = (attend(q, keys, values, mask) if means is None  # [B, H, T, E]
                        else sparq_attend(q, keys, values, mask, means[index], sparse, dense_from))
            x = x + layer.output(attended.transpose(1, 2).reshape(batch, num_new, -1))
            gate, up = layer.gate_up(_rms_norm(x, layer.mlp_norm, c.rms_norm_eps)).chunk(2, -1)
            x = x + layer.down(F.silu(gate) * up)
            if index in capture:
                captured[index] = x
        cache.length = start + num_new
        hidden = _rms_norm(x, self.norm, c.rms_norm_eps)
        layers = torch.stack([captured[i] for i in capture], 2) if capture else None
        return ForwardOutput(logits=self.logits(hidden if logit_indices is None else hidden[:, logit_indices]),
                             hidden=hidden, layers=layers)

    @property
    def batches(self) -> bool:
        """Whether forward_batch runs its sequences in one pass (else one after another, the same results)."""
        return self.fused

    @torch.inference_mode()
    def forward_batch(self, items: list["BatchItem"], capture: tuple[int, ...] = ()) -> list[ForwardOutput]:
        """Several sequences' new tokens, each over its own cache (of one sequence), in one pass where the
        layers run on the kernel: every matmul over all their rows at once, each sequence attending its own
        cache. A row's results are the same bits as in `forward` alone (every step is row-wise or
        row-invariant), so batching changes no sequence's law. Elsewhere (torch's kernels, long runs) the
        sequences run one after another. Returns each item's ForwardOutput, as `forward` would."""
        if not self.fused or not items or any(item.tokens.shape[0] > FEW_QUERIES for item in items):
            return [self.forward(item.tokens[None], item.positions, item.cache, item.attention_mask,
                                 item.logit_indices, capture=capture) for item in items]
        if any(not 0 <= i < self.config.num_layers for i in capture):
            raise InvalidInputError(f"capture names layers {capture}; this model has {self.config.num_layers}")
        segments, positions = [], []
        for item in items:
            tokens = item.tokens[None]
            if item.cache.keys.shape[1] != 1:
                raise InvalidInputError("forward_batch takes one sequence's cache an item")
            num_new = tokens.shape[1]
            mask = (causal_mask(item.cache.length, num_new) if item.attention_mask is None
                    else item.attention_mask.reshape(num_new, -1))
            self._check(tokens, item.positions.reshape(1, -1), item.cache, mask)
            start = item.cache.reserve(num_new)
            segments.append(kernels.Segment(num_new, item.cache.keys, item.cache.values, item.cache.keys_t, 0, start,
                                            mask.contiguous()))
            positions.append(item.positions.reshape(-1))
        positions = torch.cat(positions)
        x = self.embed(torch.cat([item.tokens for item in items])).float().contiguous()  # [rows, D]
        cos, sin = self.cos[positions].contiguous(), self.sin[positions].contiguous()  # [rows, E]
        stack, captured = self._fused_stack(), {}
        for first, count in _spans(len(self.layers), set(capture), frozenset()):
            stack(x, cos, sin, segments, first, count)
            if first + count - 1 in capture:
                captured[first + count - 1] = x.clone()
        for item, segment in zip(items, segments):
            item.cache.length = segment.start + segment.tokens
        hidden = _rms_norm(x, self.norm, self.config.rms_norm_eps)
        bounds = torch.tensor([0] + [segment.tokens for segment in segments]).cumsum(0).tolist()
        # The LM head once over every row asked for (its weight read once for all the sequences).
        wanted = [torch.arange(lo, hi) if item.logit_indices is None else lo + item.logit_indices
                  for item, lo, hi in zip(items, bounds, bounds[1:])]
        logits = self.logits(hidden[torch.cat(wanted)]) if sum(len(w) for w in wanted) else None
        outputs, taken = [], 0
        for item, lo, hi, rows in zip(items, bounds, bounds[1:], wanted):
            layers = torch.stack([captured[i][lo:hi] for i in capture], 1)[None] if capture else None
            outputs.append(ForwardOutput(
                logits=(logits[taken : taken + len(rows)] if len(rows) else hidden.new_empty(0, self.config.vocab_size))[None],
                hidden=hidden[lo:hi][None], layers=layers))
            taken += len(rows)
        return outputs

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        """The LM head over final hidden states [..., D] -> float32 [..., V]: the same bits for a row
        whether computed here later or inside forward (so a caller may run the head only on the rows it reads)."""
        logits = self.head(hidden).float()
        if self.vocab_subset is not None:
            full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
            logits = full.index_copy_(-1, self.vocab_subset, logits)
        return logits


@dataclass
class BatchItem:
    """One sequence's part of a batched pass (LlamaForward.forward_batch): tokens [T] at positions [T] over its
    own cache; attention_mask [T, cache.length + T] bool (default causal); logit_indices: which of the T tokens
    need logits (all by default)."""

    tokens: Tensor
    positions: Tensor
    cache: KVCache
    attention_mask: Tensor | None = None
    logit_indices: Tensor | None = None


def _spans(layers: int, ends: set[int], skip: frozenset[int]) -> list[tuple[int, int]]:
    """(first, count) runs of consecutive layers not skipped, each also ending at every layer in `ends`
    (a captured layer: its output is read between kernel calls)."""
    spans, first = [], None
    for index in range(layers):
        if index in skip:
            if first is not None:
                spans.append((first, index - first))
            first = None
            continue
        first = index if first is None else first
        if index in ends or index == layers - 1:
            spans.append((first, index + 1 - first))
            first = None
    return spans


@register_forward(*LLAMA_FAMILY)
def build_llama(hf_config, state: dict[str, Tensor | BlockQuantized], precision: str) -> LlamaForward:
    """spectr's Llama forward from a transformers config and a state dict (raises UnsupportedModelError)."""
    config = ModelConfig.from_transformers(hf_config)
    return LlamaForward(config, state, rotary_tables(hf_config, config.context_length), precision)
