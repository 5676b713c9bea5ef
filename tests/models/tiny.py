"""Tiny random-weight models (fast, offline) for the model and decoding tests."""

import torch
import transformers

VOCAB = 96


def tiny_config(kind: str = "llama-gqa", **overrides):
    """A few-layer config of a Llama-family architecture (or another, for the fallback)."""
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    if kind == "llama-gqa":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True)
    elif kind == "llama-mha-untied":
        config = transformers.LlamaConfig(**{**common, "num_key_value_heads": 4}, tie_word_embeddings=False)
    elif kind == "llama-mqa-scaled-rope":
        config = transformers.LlamaConfig(
            **{**common, "num_key_value_heads": 1, "num_attention_heads": 8, "hidden_size": 128},
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            tie_word_embeddings=True,
        )
    elif kind == "llama3-rope":
        config = transformers.LlamaConfig(
            **common,
            rope_parameters={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0,
            },
        )
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    elif kind == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    elif kind == "gpt_neox":
        config = transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256,
        )
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(kind: str = "llama-gqa", seed: int = 0, **overrides):
    """A transformers model with random weights (biases too, so none is silently ignored)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind, **overrides)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model
