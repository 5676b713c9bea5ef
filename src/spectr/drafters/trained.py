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
import json
from pathlib import Path

from safetensors.torch import load_file

from spectr.errors import ModelNotFoundError, UnsupportedModelError
from spectr.models.config import ModelConfig
from spectr.models.llama import LlamaForward
from spectr.models.loading import rotary_tables
from spectr.training.distill import MANIFEST, WEIGHTS


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
    tensors = load_file(str(path / WEIGHTS))
    kept = tensors.pop("kept_tokens").long()
    target_state = hf_target.state_dict()
    if int(kept.max()) >= hf_target.config.vocab_size:
        raise UnsupportedModelError(f"the draft at {path} was trained for another vocabulary than this target's")
    state = {name: tensor.float() for name, tensor in tensors.items()}
    state["model.embed_tokens.weight"] = target_state["model.embed_tokens.weight"]
    if not hf_target.config.tie_word_embeddings:
        state["lm_head.weight"] = target_state["lm_head.weight"]
    config = replace(ModelConfig.from_transformers(hf_target.config), num_layers=int(manifest["layers"]))
    return LlamaForward(config, state, rotary_tables(hf_target.config, config.context_length), precision,
                        vocab_subset=kept)
