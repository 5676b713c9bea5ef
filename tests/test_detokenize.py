"""Incremental detokenization equals decoding the whole output, however the tokens arrive."""

from hypothesis import given, settings, strategies as st
import pytest

from spectr.detokenize import IncrementalText
from spectr.models.gguf import GGUFModel
from spectr.models.loading import resolve_source

pytestmark = pytest.mark.real_model

TEXT = "Größe: 12 µm — naïve café 東京 🙂 def f(x):\n    return x ** 2  # ok"


@pytest.fixture(scope="module")
def tokenizer():
    source = resolve_source(None)
    return GGUFModel(source.folder / source.gguf_file).tokenizer()


def _pieces(tokens, cuts):
    bounds = sorted({0, len(tokens), *[c % (len(tokens) + 1) for c in cuts]})
    return [tokens[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=12), start=st.integers(0, 10), byte_tokens=st.booleans())
def test_settled_plus_pending_is_the_whole_decode(tokenizer, cuts, start, byte_tokens):
    tokens = tokenizer(TEXT, add_special_tokens=False).input_ids[start:]
    if byte_tokens:  # byte-level pieces: one character split over several tokens
        tokens = [t for t in tokens for t in tokenizer.convert_tokens_to_ids(list(tokenizer.convert_ids_to_tokens(t)))]
    text = IncrementalText(tokenizer, keep=5)
    seen = ""
    for piece in _pieces(tokens, cuts):
        expected = tokenizer.decode(tokens[: len(text._tokens) + len(piece)], skip_special_tokens=True)
        pending = text.pending(piece)
        assert expected.endswith(pending) and len(expected) == text.length + len(pending)
        text.extend(piece)
        seen = expected
    assert text.recent == seen[: text.length][-5:]


def test_a_closing_stop_token_is_not_shown(tokenizer):
    eos = tokenizer.eos_token_id
    tokens = tokenizer("Hello there", add_special_tokens=False).input_ids
    text = IncrementalText(tokenizer, hidden=frozenset({eos}))
    text.extend(tokens[:1])
    assert text.pending(tokens[1:] + [eos]) == tokenizer.decode(tokens)[text.length:]
