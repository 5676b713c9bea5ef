"""Models: loading (local folders, GGUF, the default target), spectr's forward, the cache."""

from spectr.models.cache import KVCache
from spectr.models.config import ModelConfig
from spectr.models.llama import ForwardOutput, LlamaForward, causal_mask
from spectr.models.loading import LoadedModel, check_same_tokenizer, load_model, native_forward, resolve_source
from spectr.models.reference import TransformersForward

__all__ = [
    "ForwardOutput",
    "KVCache",
    "LlamaForward",
    "LoadedModel",
    "ModelConfig",
    "TransformersForward",
    "causal_mask",
    "check_same_tokenizer",
    "load_model",
    "native_forward",
    "resolve_source",
]
