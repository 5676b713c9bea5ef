"""Drafts made by `spectr train-draft`, built around the target's embedding and head rows.

Two kinds: a standalone draft (a few Llama layers, format spectr-draft-1) and
an EAGLE-style head (one layer over the target's features and the token
embedding, format spectr-eagle-1; drafted by EagleDrafter). A draft folder
holds `draft.safetensors` (its layers, final norm, the ids of the tokens its
head predicts) and `draft.json` (the recipe and its measured acceptance). The
embedding and the head rows are taken from the target when the draft is
loaded, so the folder stays small.
"""

from dataclasses import replace
import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file
import torch

from spectr.errors import ModelNotFoundError, UnsupportedModelError
from spectr.models.config import ModelConfig
from spectr.models.llama import LlamaForward
from spectr.models.loading import rotary_tables

WEIGHTS = "draft.safetensors"
MANIFEST = "draft.json"


def target_identity(hf_target) -> dict:
    """What a trained draft is bound to, recorded in its manifest and checked when it is loaded.

    The draft borrows the target's embedding and head rows, so a target with the same vocabulary
    size but other weights (another model, a fine-tune) would read the wrong rows: the fingerprint
    is over those weights, rounded to bf16 so that fp32 and bf16 loads of one file agree.
    """
    config, state = hf_target.config, hf_target.state_dict()
    borrowed = ["model.embed_tokens.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    digest = hashlib.sha256()
    for name in borrowed:
        digest.update(state[name].detach().to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return {"model_type": config.model_type, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers, "weights_sha256": digest.hexdigest()}


def is_trained_draft(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / MANIFEST).is_file()


def load_trained_draft(path: str | Path, hf_target, precision: str = "bf16") -> LlamaForward:
    """The draft at `path` as a forward, built around the target's embedding and head."""
    path = Path(path)
    if not is_trained_draft(path):
        raise ModelNotFoundError(f"{path} is not a trained draft (it needs {WEIGHTS} and {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") not in ("spectr-draft-1", "spectr-eagle-1"):
        raise UnsupportedModelError(f"{path / MANIFEST} has an unknown format {manifest.get('format')!r}")
    recorded, actual = manifest.get("target"), target_identity(hf_target)
    if recorded is None:
        raise UnsupportedModelError(f"the draft at {path} does not record which target it was trained for; "
                                    "re-export it with this version of spectr")
    if recorded != actual:
        differ = ", ".join(f"{key} {recorded.get(key)!r} (this target: {value!r})"
                           for key, value in actual.items() if recorded.get(key) != value)
        raise UnsupportedModelError(f"the draft at {path} was trained for another target: {differ}")
    tensors = load_file(str(path / WEIGHTS))
    kept = tensors.pop("kept_tokens").long()
    target_state = hf_target.state_dict()
    state = {name: tensor.float() for name, tensor in tensors.items()}
    state["model.embed_tokens.weight"] = target_state["model.embed_tokens.weight"]
    if not hf_target.config.tie_word_embeddings:
        state["lm_head.weight"] = target_state["lm_head.weight"]
    config = replace(ModelConfig.from_transformers(hf_target.config), num_layers=int(manifest["layers"]))
    return LlamaForward(config, state, rotary_tables(hf_target.config, config.context_length), precision,
                        vocab_subset=kept)
