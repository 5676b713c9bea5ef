"""Drafts made by `spectr train-draft`, built around the target's embedding and head rows.

Two kinds: a standalone draft (a few Llama layers, format spectr-draft-1) and
an EAGLE-style head (one layer over the target's features and the token
embedding, format spectr-eagle-1; drafted by EagleDrafter). A draft folder
holds `draft.safetensors` (its layers, final norm, the ids of the tokens its
head predicts) and `draft.json` (the recipe and its measured acceptance). The
embedding and the head rows are taken from the target when the draft is
loaded, so the folder stays small.
"""

from collections.abc import Callable
from dataclasses import replace
import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file
import torch

from spectr.errors import ModelNotFoundError, UnsupportedModelError
from spectr.models.config import ModelConfig
from spectr.models.llama import LlamaForward
from spectr.models.llama import rotary_tables

WEIGHTS = "draft.safetensors"
MANIFEST = "draft.json"


def _config_and_weights(target) -> tuple[object, Callable[[str], torch.Tensor]]:
    """A target's transformers config and a float32 weight by transformers name, from a loaded model
    (`spectr.models.LoadedModel`, which reads a GGUF's weights without transformers) or a transformers model."""
    if hasattr(target, "hf_config") and hasattr(target, "weight"):
        return target.hf_config, target.weight
    state = target.state_dict()
    return target.config, lambda name: state[name].detach().float()


def target_identity(target) -> dict:
    """What a trained draft is bound to, recorded in its manifest and checked when it is loaded.

    The draft borrows the target's embedding and head rows, so a target with the same vocabulary
    size but other weights (another model, a fine-tune) would read the wrong rows: the fingerprint
    is over those weights, rounded to bf16 so that fp32 and bf16 loads of one file agree.
    """
    config, weight = _config_and_weights(target)
    borrowed = ["model.embed_tokens.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    digest = hashlib.sha256()
    for name in borrowed:
        digest.update(weight(name).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    identity = {"model_type": config.model_type, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
                "num_layers": config.num_hidden_layers, "weights_sha256": digest.hexdigest()}
    tokenizer = getattr(target, "tokenizer", None)
    if tokenizer is not None:  # same weights under another tokenizer would draft other strings
        vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        identity["tokenizer_sha256"] = hashlib.sha256(vocabulary.encode()).hexdigest()
    return identity


def is_trained_draft(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / MANIFEST).is_file()


def load_trained_draft(path: str | Path, target, precision: str = "bf16") -> LlamaForward:
    """The draft at `path` as a forward, built around the embedding and head of `target`
    (a loaded model or a transformers model)."""
    path = Path(path)
    if not is_trained_draft(path):
        raise ModelNotFoundError(f"{path} is not a trained draft (it needs {WEIGHTS} and {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") not in ("spectr-draft-1", "spectr-eagle-1", "spectr-eagle-2"):
        raise UnsupportedModelError(f"{path / MANIFEST} has an unknown format {manifest.get('format')!r}")
    recorded, actual = manifest.get("target"), target_identity(target)
    if recorded is None:
        raise UnsupportedModelError(f"the draft at {path} does not record which target it was trained for; "
                                    "re-export it with this version of spectr")
    # A fingerprint one side lacks (a draft recorded before tokenizers were, or a target given without
    # its tokenizer) is not compared; everything both record must agree.
    differ = ", ".join(f"{key} {recorded[key]!r} (this target: {value!r})"
                       for key, value in actual.items() if key in recorded and recorded[key] != value)
    missing = [key for key in ("model_type", "vocab_size", "weights_sha256") if key not in recorded]
    if missing:
        raise UnsupportedModelError(f"the draft at {path} does not record {', '.join(missing)} of its target")
    if differ:
        raise UnsupportedModelError(f"the draft at {path} was trained for another target: {differ}")
    hf_config, weight = _config_and_weights(target)
    tensors = load_file(str(path / WEIGHTS))
    kept = tensors.pop("kept_tokens").long()
    state = {name: tensor.float() for name, tensor in tensors.items()}
    state["model.embed_tokens.weight"] = weight("model.embed_tokens.weight")
    if not hf_config.tie_word_embeddings:
        state["lm_head.weight"] = weight("lm_head.weight")
    config = replace(ModelConfig.from_transformers(hf_config), num_layers=int(manifest["layers"]))
    draft = LlamaForward(config, state, rotary_tables(hf_config, config.context_length), precision,
                         vocab_subset=kept)
    # A fused-feature head reads these layers of the target (the decoder asks the target for them).
    draft.feature_layers = tuple(manifest.get("feature_layers") or ())
    if bool(draft.feature_layers) != (draft.fusion is not None):
        raise UnsupportedModelError(f"{path}: the manifest's feature_layers and the weights disagree")
    return draft
