"""Logits processing: greedy, temperature, top-k and top-p, identical for target and draft."""

import pytest
import torch

from spectr.errors import InvalidInputError
from spectr.processing import NUCLEUS_SHORTLIST, SamplingParams, logits_to_probs


def _logits(vocab=50, rows=3, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_a_point_mass_on_the_first_argmax():
    logits = torch.tensor([[1.0, 5.0, 5.0, 2.0]])
    probs = logits_to_probs(logits, SamplingParams(temperature=0))
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_temperature_scales_logits():
    logits = _logits()
    probs = logits_to_probs(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(probs, (logits / 0.5).softmax(-1))


def test_top_k_keeps_the_k_most_likely():
    logits = _logits()
    probs = logits_to_probs(logits, SamplingParams(top_k=5))
    assert ((probs > 0).sum(-1) == 5).all()
    top = logits.topk(5).indices
    torch.testing.assert_close(probs.gather(-1, top), logits.gather(-1, top).softmax(-1))


@pytest.mark.parametrize("vocab", [50, NUCLEUS_SHORTLIST * 3])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_top_p_keeps_the_smallest_nucleus(vocab, top_p):
    logits = _logits(vocab=vocab, seed=vocab) / (3 if vocab > 100 else 1)  # flat rows: nucleus beyond the shortlist
    probs = logits_to_probs(logits, SamplingParams(top_p=top_p))
    full = logits.softmax(-1)
    for row in range(logits.shape[0]):
        ordered, order = full[row].sort(descending=True)
        size = int((ordered.cumsum(0) - ordered < top_p).sum())  # tokens needed to reach top_p
        expected = torch.zeros_like(full[row])
        expected[order[:size]] = ordered[:size] / ordered[:size].sum()
        torch.testing.assert_close(probs[row], expected)


def test_bad_parameters_are_named():
    with pytest.raises(InvalidInputError, match="temperature"):
        SamplingParams(temperature=-0.1)
    with pytest.raises(InvalidInputError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(InvalidInputError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(InvalidInputError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidInputError, match="top_p"):
        SamplingParams(top_p=1.5)
