"""The Python API and the CLI, on a tiny local model (no real model needed)."""

import pytest
from typer.testing import CliRunner

import spectr
from spectr.cli import app
from spectr.errors import InvalidInputError
from tests.models.test_loading import save_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(tiny_folder):
    return spectr.load(tiny_folder, draft="ngram", precision="fp32")


PROMPT = "w3 w5 w7 w3 w5 w7 w3 w5"


def test_generate_collects_the_stream(engine):
    options = dict(seed=4, max_new_tokens=20, temperature=1.0, k=2, L=3)
    streamed = list(spectr.stream(engine, PROMPT, **options))
    result = spectr.generate(engine, PROMPT, **options)
    assert result.text == "".join(chunk.text for chunk in streamed)
    assert streamed[-1].finished and result.finish_reason in ("length", "stop")
    assert result.stats.new_tokens == len(result.tokens) <= 20
    assert result.stats.steps == len(streamed)  # one chunk a target pass
    assert result.stats.block_efficiency == len(result.tokens) / len(streamed)
    assert spectr.generate(engine, PROMPT, **options).tokens == result.tokens  # seeded


def test_methods_agree_greedily(engine):
    runs = {
        method: spectr.generate(engine, PROMPT, method=method, temperature=0, max_new_tokens=16, k=2, L=2).tokens
        for method in ("ar", "sd", "spectr")
    }
    assert runs["ar"] == runs["sd"] == runs["spectr"]


@pytest.fixture(scope="module")
def self_drafted(tiny_folder):
    """The target drafts for itself: every draft is accepted, so each step emits L + 1 tokens."""
    return spectr.load(tiny_folder, draft=tiny_folder, precision="fp32")


def test_stop_strings_across_tokens_trim_the_tokens_and_the_stats(self_drafted):
    options = dict(seed=3, temperature=1.0, max_new_tokens=24, k=1, L=4)
    full = spectr.generate(self_drafted, PROMPT, **options)
    words = full.text.split()
    assert len(full.tokens) == 24 and len(set(words)) > 10  # varied text: the cut cannot be trivially empty
    stop = words[6][-1] + " " + words[7][:2]  # spans tokens 6 and 7; token 7 is inside the second step
    assert full.text.index(stop) == len(" ".join(words[:7])) - 1
    cut = spectr.generate(self_drafted, PROMPT, stop=[stop], **options)
    assert cut.finish_reason == "stop"
    assert cut.text == " ".join(words[:7])[:-1]
    assert cut.tokens == full.tokens[:8]  # up to the token that completes the stop string, as ar would stop
    assert (cut.stats.new_tokens, cut.stats.steps, cut.stats.accepted_per_position) == (8, 2, [2, 2, 2, 1])
    streamed = list(spectr.stream(self_drafted, PROMPT, stop=[stop], **options))
    assert "".join(chunk.text for chunk in streamed) == cut.text
    assert [token for chunk in streamed for token in chunk.tokens] == cut.tokens


def test_seeded_generation_repeats_with_every_drafter(tiny_folder, engine, self_drafted):
    for drafted in (engine, self_drafted):
        for method in ("ar", "sd", "spectr"):
            options = dict(method=method, seed=11, temperature=1.0, max_new_tokens=16, k=2, L=3)
            first = spectr.generate(drafted, PROMPT, **options)
            assert spectr.generate(drafted, PROMPT, **options).tokens == first.tokens
            assert spectr.generate(drafted, PROMPT, **{**options, "seed": 12}).tokens != first.tokens


def test_bad_requests_are_named(engine):
    with pytest.raises(InvalidInputError, match="no chat template"):
        spectr.generate(engine, "hello", chat=True)
    with pytest.raises(InvalidInputError, match="temperature"):
        spectr.generate(engine, PROMPT, temperature=-1)
    with pytest.raises(InvalidInputError, match="k must be"):
        spectr.generate(engine, PROMPT, k=0)


def test_cli_generate(tiny_folder):
    result = CliRunner().invoke(
        app, ["generate", PROMPT, "--target", str(tiny_folder), "--draft", "ngram", "--precision", "fp32",
              "--seed", "1", "--max-new-tokens", "12", "-k", "2", "-L", "2"],
    )
    assert result.exit_code == 0, result.output
    expected = spectr.generate(spectr.load(tiny_folder, draft="ngram", precision="fp32"), PROMPT, seed=1,
                               max_new_tokens=12, k=2, L=2)
    assert expected.text in result.output  # the CLI streams exactly what the library samples
    assert f"{expected.stats.new_tokens} tokens in" in result.output
    assert f"{expected.stats.steps} target passes" in result.output


def test_cli_names_bad_input(tiny_folder):
    result = CliRunner().invoke(app, ["generate", PROMPT, "--target", str(tiny_folder / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = CliRunner().invoke(app, ["generate", PROMPT, "--target", str(tiny_folder), "-L", "0"])
    assert result.exit_code == 2 and "L must be an int >= 1" in result.output


def test_cli_chat_session(tiny_folder):
    result = CliRunner().invoke(app, ["chat", "--target", str(tiny_folder)], input="w3 w4\n\n")
    assert result.exit_code == 0
    assert "no chat template" in result.output  # the tiny tokenizer has none: said, and the loop goes on


def test_one_settings_model_is_built_once_and_checked_by_name(engine):
    from spectr.decoding import DEFAULT_SHAPE, DecodeSettings
    from spectr.settings import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, GenerationSettings

    settings = GenerationSettings.build()
    assert settings.sampling.temperature == DEFAULT_TEMPERATURE and settings.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert settings.decode.tree == "auto" and settings.logprobs is None
    assert (DecodeSettings().k, DecodeSettings().length) == DEFAULT_SHAPE["sampling"]
    assert GenerationSettings.build(stop="w9").stop == ("w9",)
    assert GenerationSettings.build(logit_bias={7: 1.0, 3: -2.0}).sampling.logit_bias == ((3, -2.0), (7, 1.0))
    for options, name in [({"logprobs": 21}, "logprobs"), ({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"seed": "x"}, "seed"), ({"stop": [3]}, "stop"), ({"presence_penalty": 9}, "presence"),
                          ({"k": 0}, "k")]:
        with pytest.raises(InvalidInputError, match=name):
            GenerationSettings.build(**options)
    with pytest.raises(InvalidInputError, match="not both"):
        list(spectr.stream(engine, PROMPT, settings, k=2))
    fixed = GenerationSettings.build(k=2, L=3, seed=4, max_new_tokens=12, logprobs=2)
    by_settings = spectr.generate(engine, PROMPT, fixed)
    by_options = spectr.generate(engine, PROMPT, k=2, L=3, seed=4, max_new_tokens=12, logprobs=2)
    assert by_settings.tokens == by_options.tokens and by_settings.logprobs == by_options.logprobs
    assert [entry.token for entry in by_settings.logprobs] == by_settings.tokens
    assert all(len(entry.top) == 2 for entry in by_settings.logprobs)


def test_cli_penalties_reach_the_sample(tiny_folder, engine):
    options = dict(seed=3, max_new_tokens=12, k=2, L=2)
    result = CliRunner().invoke(app, ["generate", PROMPT, "--target", str(tiny_folder), "--draft", "ngram",
                                      "--precision", "fp32", "--seed", "3", "--max-new-tokens", "12", "-k", "2",
                                      "-L", "2", "--repetition-penalty", "1.5", "--presence-penalty", "1"])
    assert result.exit_code == 0, result.output
    penalized = spectr.generate(engine, PROMPT, repetition_penalty=1.5, presence_penalty=1.0, **options)
    assert penalized.text != spectr.generate(engine, PROMPT, **options).text
    assert result.stdout.startswith(penalized.text)


def test_the_stats_split_the_prompt_pass_from_decoding(engine):
    stats = spectr.generate(engine, PROMPT, seed=0, max_new_tokens=12, temperature=1.0).stats
    assert 0 < stats.prefill_seconds < stats.seconds
    assert stats.decode_tokens_per_second == pytest.approx(stats.new_tokens / (stats.seconds - stats.prefill_seconds))
    assert stats.decode_tokens_per_second > stats.tokens_per_second
    assert stats.summary().startswith(f"prompt {stats.prompt_tokens} tokens in ")


def test_a_self_draft_is_named_and_exact_greedily(tiny_folder, engine):
    selfskip = spectr.load(tiny_folder, draft="self-skip:0", precision="fp32")
    assert "the target itself, layers 0 of 2 skipped" in selfskip.describe()
    options = dict(temperature=0, max_new_tokens=16, k=2, L=2)
    assert spectr.generate(selfskip, PROMPT, **options).tokens == spectr.generate(engine, PROMPT, **options).tokens
    with pytest.raises(InvalidInputError, match="layers 0..1"):
        spectr.load(tiny_folder, draft="self-skip:5", precision="fp32")
