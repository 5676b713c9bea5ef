"""Models: loading (local folders, GGUF, the default target), spectr's forward, the cache."""

from spectr.models.base import Forward, ForwardOutput, build_forward, native_model_types, register_forward
from spectr.models.cache import KVCache
from spectr.models.config import ModelConfig
from spectr.models.llama import LlamaForward, causal_mask
from spectr.models.loading import (LoadedModel, check_same_tokenizer, load_model, native_forward, resolve_source,
                                   stop_token_ids)
from spectr.models.reference import TransformersForward

__all__ = [
    "Forward",
    "ForwardOutput",
    "KVCache",
    "LlamaForward",
    "LoadedModel",
    "ModelConfig",
    "TransformersForward",
    "build_forward",
    "causal_mask",
    "check_same_tokenizer",
    "load_model",
    "native_forward",
    "native_model_types",
    "register_forward",
    "resolve_source",
    "stop_token_ids",
]
