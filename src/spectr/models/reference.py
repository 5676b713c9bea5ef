"""transformers' own forward behind spectr's interface.

Two uses: the fallback for architectures spectr's forward does not implement
(slower, but the same tree attention and cache commit), and the reference the
native forward is tested against. The cache is transformers' DynamicCache;
tree masks go in as custom 4D masks.
"""

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from spectr.errors import ContextOverflowError, InvalidInputError
from spectr.models.base import ForwardOutput
from spectr.models.llama import causal_mask


@dataclass
class ReferenceCache:
    """A DynamicCache with the KVCache operations spectr needs."""

    inner: DynamicCache
    capacity: int

    @property
    def length(self) -> int:
        return self.inner.get_seq_length()

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise InvalidInputError(f"cannot truncate a cache of length {self.length} to {length}")
        self._select(torch.arange(length))

    def commit(self, prefix: int, slots: list[int]) -> None:
        self._select(list(range(prefix)) + list(slots))

    def _select(self, indices: Tensor | list[int]) -> None:
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.length):
            raise InvalidInputError(f"commit() slots must lie in [0, {self.length}), got {indices.tolist()}")
        for layer in self.inner.layers:
            layer.keys = layer.keys[:, :, indices]
            layer.values = layer.values[:, :, indices]


@dataclass(frozen=True)
class ReferenceConfig:
    """The part of ModelConfig every backend shares: what callers size and check against."""

    vocab_size: int
    context_length: int


class TransformersForward:
    """forward(tokens, positions, cache, attention_mask) -> logits, computed by transformers."""

    backend = "transformers"

    def __init__(self, hf_model, precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise InvalidInputError(f"the transformers backend runs fp32 or bf16, not '{precision}'")
        self.dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        self.model = hf_model.to(self.dtype).eval()
        self.precision = precision
        self.config = ReferenceConfig(hf_model.config.vocab_size, hf_model.config.max_position_embeddings)

    def new_cache(self, capacity: int | None = None, batch: int = 1) -> ReferenceCache:
        context = self.config.context_length
        capacity = context if capacity is None else capacity
        if not 0 < capacity <= context:
            raise ContextOverflowError(
                f"a cache of {capacity} tokens was asked for; the model's context is {context}"
            )
        return ReferenceCache(inner=DynamicCache(config=self.model.config), capacity=capacity)

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: ReferenceCache,
        attention_mask: Tensor | None = None,
        logit_indices: Tensor | None = None,
    ) -> ForwardOutput:
        batch, num_new = tokens.shape
        positions = positions.expand(batch, -1) if positions.ndim == 1 else positions
        if cache.length + num_new > cache.capacity:
            raise ContextOverflowError(
                f"the KV cache holds {cache.capacity} tokens; {cache.length} are in use and {num_new} more were given"
            )
        if positions.numel() and int(positions.max()) >= self.config.context_length:
            raise ContextOverflowError(
                f"position {int(positions.max())} is beyond the model's context of {self.config.context_length} tokens"
            )
        mask = causal_mask(cache.length, num_new) if attention_mask is None else attention_mask
        additive = torch.zeros(mask.shape, dtype=self.dtype).masked_fill(~mask, torch.finfo(self.dtype).min)
        out = self.model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=additive.expand(batch, -1, -1)[:, None],
            past_key_values=cache.inner,
            use_cache=True,
            output_hidden_states=True,
        )
        logits, hidden = out.logits, out.hidden_states[-1]
        if logit_indices is not None:
            logits = logits[:, logit_indices]
        return ForwardOutput(logits=logits.float(), hidden=hidden)
