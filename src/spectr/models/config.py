"""What spectr's own forward needs to know about a model, read from its transformers config."""

from dataclasses import dataclass

from spectr.errors import UnsupportedModelError

# The Llama family this config describes: RMSNorm, RoPE, grouped-query attention, SwiGLU.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
NATIVE_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")  # position-independent inv_freq


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    context_length: int  # longest sequence the forward accepts
    tie_word_embeddings: bool

    @classmethod
    def from_transformers(cls, hf_config) -> "ModelConfig":
        """Read a transformers config, raising UnsupportedModelError where spectr's forward would differ."""
        model_type = hf_config.model_type
        if model_type not in LLAMA_FAMILY:
            raise UnsupportedModelError(
                f"spectr's Llama forward implements {', '.join(LLAMA_FAMILY)}; this model is '{model_type}'"
            )
        activation = getattr(hf_config, "hidden_act", "silu")
        if activation != "silu":
            raise UnsupportedModelError(f"spectr's own forward implements SwiGLU (silu); this model uses '{activation}'")
        rope = getattr(hf_config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in NATIVE_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type '{rope_type}' (it depends on the sequence length) is not implemented by spectr's forward"
            )
        context = hf_config.max_position_embeddings
        window = getattr(hf_config, "sliding_window", None)
        if window is not None and getattr(hf_config, "use_sliding_window", True):
            # Exact without a windowed mask as long as no sequence outgrows the window.
            context = min(context, window)
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            context_length=context,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )
