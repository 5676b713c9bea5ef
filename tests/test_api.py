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
    assert result.stats.block_efficiency >= 1.0
    assert spectr.generate(engine, PROMPT, **options).tokens == result.tokens  # seeded


def test_methods_agree_greedily(engine):
    runs = {
        method: spectr.generate(engine, PROMPT, method=method, temperature=0, max_new_tokens=16, k=2, L=2).tokens
        for method in ("ar", "sd", "spectr")
    }
    assert runs["ar"] == runs["sd"] == runs["spectr"]


def test_stop_strings_cut_the_text(engine):
    full = spectr.generate(engine, PROMPT, temperature=0, max_new_tokens=16)
    words = full.text.split()
    assert len(words) > 3
    stop = words[3]
    cut = spectr.generate(engine, PROMPT, temperature=0, max_new_tokens=16, stop=[stop])
    assert stop not in cut.text and full.text.startswith(cut.text) and cut.finish_reason == "stop"


def test_bad_requests_are_named(engine):
    with pytest.raises(InvalidInputError, match="no chat template"):
        spectr.generate(engine, "hello", chat=True)
    with pytest.raises(InvalidInputError, match="temperature"):
        spectr.generate(engine, PROMPT, temperature=-1)
    with pytest.raises(InvalidInputError, match="k must be"):
        spectr.generate(engine, PROMPT, k=0)


def test_cli_generate(tiny_folder):
    result = CliRunner().invoke(
        app, ["generate", PROMPT, "--target", str(tiny_folder), "--precision", "fp32", "--seed", "1",
              "--max-new-tokens", "12", "-k", "2", "-L", "2"],
    )
    assert result.exit_code == 0, result.output
    assert "block efficiency" in result.output


def test_cli_names_bad_input(tiny_folder):
    result = CliRunner().invoke(app, ["generate", PROMPT, "--target", str(tiny_folder / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = CliRunner().invoke(app, ["generate", PROMPT, "--target", str(tiny_folder), "-L", "0"])
    assert result.exit_code == 2 and "L must be an int >= 1" in result.output


def test_cli_chat_session(tiny_folder):
    result = CliRunner().invoke(app, ["chat", "--target", str(tiny_folder)], input="w3 w4\n\n")
    assert result.exit_code == 0
    assert "no chat template" in result.output  # the tiny tokenizer has none: said, and the loop goes on
