"""The draft's training data: prompts the target writes itself, the near-duplicate filter, and a
batched generator that is deterministic under a seed, resumes exactly and keeps the split by prompt."""

import json

import pytest
import torch

from spectr.models import load_model
from spectr.training import prompts
from spectr.training.magpie import PromptFilter, user_turn
from spectr.training.samples import DataRecipe, default_feature_layers, generate_dataset, load_sequences
from tests.models.test_loading import save_tiny_model

# A template with text around each user message, as real chat templates have.
TINY_TEMPLATE = ("w4 {% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}"
                 "{% if add_generation_prompt %}w2 {% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(save_tiny_model(tmp_path_factory.mktemp("target"), chat=TINY_TEMPLATE), precision="fp32")


def _recipe(**overrides) -> DataRecipe:
    settings = dict(tokens=10_000, rows=4, chunk_steps=40, max_answer_tokens=10, max_user_tokens=6, text_tokens=6,
                    max_text_tokens=10, min_kept_tokens=2, precision="fp32")
    return DataRecipe(**{**settings, **overrides})


def _generate(model, folder, recipe, chunks):
    return generate_dataset(model.lm, model.tokenizer, folder, recipe, frozenset([1]), max_chunks=chunks,
                            log=lambda message: None)


def _shards(folder):
    return [torch.load(path, weights_only=True) for path in sorted(folder.glob("shard-*.pt"))]


def test_the_user_turn_is_cut_from_the_chat_template(tiny):
    turn = user_turn(tiny.tokenizer)
    assert turn.prefix == [4, 5] and turn.end == 6 and turn.answer_header == [2]


@pytest.mark.real_model
def test_the_user_turn_of_the_default_target(real_model):
    _, tokenizer = real_model
    turn = user_turn(tokenizer)
    text = tokenizer.decode(turn.prefix)
    assert text.endswith("<|im_start|>user\n") and "system" in text
    assert tokenizer.decode([turn.end]) == "<|im_end|>"
    assert tokenizer.decode(turn.answer_header) == "\n<|im_start|>assistant\n"


def test_the_filter_refuses_near_duplicates_and_junk():
    accepted = PromptFilter()
    assert accepted.add("Explain the water cycle to a ten-year-old in simple words.")
    assert not accepted.add("explain the water cycle to a ten year old, in simple words!")  # near-duplicate
    assert accepted.add("Write a haiku about volcanoes and the sea at night.")
    assert not accepted.add("Hi there")  # too short
    assert not accepted.add("{} [] () 12345 67890 ## ** ++ -- == <<>>")  # not words
    assert accepted.rejected == {"short": 1, "long": 0, "not words": 1, "duplicate": 1}
    assert accepted.count == 2


def test_generation_is_deterministic_under_a_seed_and_resumes_exactly(tiny, tmp_path):
    recipe = _recipe()
    _generate(tiny, tmp_path / "a", recipe, chunks=2)
    _generate(tiny, tmp_path / "b", recipe, chunks=1)
    _generate(tiny, tmp_path / "b", recipe, chunks=1)  # a second run resumes after the first shard
    _generate(tiny, tmp_path / "c", _recipe(seed=1), chunks=2)
    a, b, c = _shards(tmp_path / "a"), _shards(tmp_path / "b"), _shards(tmp_path / "c")
    assert len(a) == len(b) == 2
    for left, right in zip(a, b):
        assert left.keys() == right.keys()
        for key in left:
            if isinstance(left[key], torch.Tensor):
                assert torch.equal(left[key].nan_to_num(-1), right[key].nan_to_num(-1)), key
            else:
                assert left[key] == right[key], key
    assert not torch.equal(a[0]["tokens"], c[0]["tokens"])  # another seed, other samples
    manifest = json.loads((tmp_path / "b" / "samples.json").read_text())
    assert [shard["file"] for shard in manifest["shards"]] == ["shard-0000.pt", "shard-0001.pt"]
    with pytest.raises(ValueError, match="differs in rows"):
        _generate(tiny, tmp_path / "b", _recipe(rows=3), chunks=1)


def test_sequences_carry_the_targets_features_and_law(tiny, tmp_path):
    """Every stored feature equals a fresh pass of the target over the sequence alone, and lse is its
    logsumexp where the next token was sampled: the batch (other rows, reused cache slots) changes nothing."""
    recipe = _recipe(mix=(("instruction", 0.5), ("text", 0.5)))
    _generate(tiny, tmp_path, recipe, chunks=1)
    sequences = load_sequences(tmp_path)
    assert len(sequences) >= 4 and {s.source for s in sequences} == {"instruction", "text"}
    layers = default_feature_layers(tiny.lm.config.num_layers)
    for s in sequences:
        n = s.tokens.numel()
        assert s.hidden.shape[0] == s.layers.shape[0] == s.lse.shape[0] == n - 1
        out = tiny.lm.forward(s.tokens[None, :-1], torch.arange(n - 1), tiny.lm.new_cache(n), capture=layers)
        torch.testing.assert_close(s.hidden.float(), out.hidden[0].to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(s.layers.float(), out.layers[0].to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)
        sampled = torch.arange(s.prompt_length - 1, n - 1)
        torch.testing.assert_close(s.lse[sampled], out.logits[0, sampled].logsumexp(-1), atol=1e-4, rtol=0)


def test_the_split_follows_the_prompt(tiny, tmp_path):
    """Chat prompts go by a hash of their text, raw text by its document's name; a run's two splits
    share no prompt."""
    from spectr.training import corpus

    recipe = _recipe(mix=(("instruction", 0.7), ("text", 0.3)), chunk_steps=160, max_answer_tokens=4)
    _generate(tiny, tmp_path, recipe, chunks=1)
    sequences = load_sequences(tmp_path)
    assert sum(s.held_out for s in sequences) >= 1 and sum(not s.held_out for s in sequences) >= 1
    for s in sequences:
        if s.source == "text":
            assert s.held_out == corpus.is_held_out(s.prompt.removeprefix("document:"))
        else:
            assert s.held_out == prompts.is_held_out(s.prompt)
    train, held_out = load_sequences(tmp_path, held_out=False), load_sequences(tmp_path, held_out=True)
    assert len(train) + len(held_out) == len(sequences)
    assert not {s.prompt for s in train} & {s.prompt for s in held_out}
