"""The one interface every forward implements, and the registry that picks spectr's forward by architecture.

A forward runs new tokens at explicit positions over a cache, attending where
a boolean mask allows, and returns their logits and final hidden states: the
decoder, the drafters, the bench and the server see nothing else. spectr's own
forward (`LlamaForward`, native GGUF blocks or dense weights), its compiled
variant and transformers' forward (the fallback and the reference) all
implement it. Which class runs a model is chosen here by the model's
architecture (its transformers `model_type`), not in the loading code.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from spectr.errors import UnsupportedModelError


@dataclass(frozen=True)
class ForwardOutput:
    logits: Tensor  # [B, T', V] float32 (T' = len(logit_indices) when given)
    hidden: Tensor  # [B, T, D] final-norm hidden state of every new token (the LM head's input)
    # [B, T, n, D] the residual stream after each layer named in forward(capture=...) (a fused-feature
    # draft head reads a low, a middle and a high layer of the target); None when none was asked for.
    layers: Tensor | None = None


class ForwardConfig(Protocol):
    """What callers size and check against, whatever the backend."""

    vocab_size: int
    context_length: int


@runtime_checkable
class Forward(Protocol):
    backend: str  # "spectr", "spectr-compiled", "transformers"
    precision: str  # one of spectr.precisions.PRECISIONS
    config: ForwardConfig

    def new_cache(self, capacity: int | None = None, batch: int = 1):
        """An empty cache for `batch` sequences of up to `capacity` tokens (default: the context length).
        It has `length`, `truncate(length)` and `commit(prefix, slots)`."""

    def forward(self, tokens: Tensor, positions: Tensor, cache, attention_mask: Tensor | None = None,
                logit_indices: Tensor | None = None) -> ForwardOutput:
        """Run tokens [B, T] at positions [B, T] (or [T]) over `cache`, writing their keys and values;
        attention_mask bool [T, S] or [B, T, S] (S = cache.length + T), causal by default."""


def head_of(forward: Forward):
    """The forward's LM head as a function of final hidden states ([..., D] -> float32 [..., V]) where it
    offers one (spectr's forwards: the decoder then runs the head only on the tree rows it reads), else None
    (transformers' forward: some architectures post-process logits, so all rows come from forward)."""
    return getattr(forward, "logits", None)


# A builder makes spectr's forward from a transformers config, a state dict by transformers names
# (dense tensors, or blocks as a GGUF file stores them) and a precision.
ForwardBuilder = Callable[[object, dict, str], Forward]
_BUILDERS: dict[str, ForwardBuilder] = {}


def register_forward(*model_types: str) -> Callable[[ForwardBuilder], ForwardBuilder]:
    """Register `builder` as spectr's forward for these transformers model types."""

    def register(builder: ForwardBuilder) -> ForwardBuilder:
        for model_type in model_types:
            _BUILDERS[model_type] = builder
        return builder

    return register


def native_model_types() -> tuple[str, ...]:
    """The architectures spectr's own forward implements."""
    return tuple(sorted(_BUILDERS))


def build_forward(hf_config, state: dict, precision: str) -> Forward:
    """spectr's forward for this architecture; UnsupportedModelError if none is registered (or the
    builder refuses the config)."""
    builder = _BUILDERS.get(hf_config.model_type)
    if builder is None:
        raise UnsupportedModelError(
            f"spectr's own forward implements {', '.join(native_model_types())}; this model is '{hf_config.model_type}'"
        )
    return builder(hf_config, state, precision)
