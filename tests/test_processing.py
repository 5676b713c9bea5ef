"""Logits processing: greedy, temperature, top-k, top-p, penalties and logit bias, identical for target and draft."""

from dataclasses import replace
import math

import pytest
import torch

from spectr.errors import InvalidInputError
from spectr.processing import (NUCLEUS_SHORTLIST, SamplingParams, TokenHistory, logits_to_probs, node_paths,
                               token_logprob)


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


def _penalized_reference(logits, prompt, generated, params):
    """Bias, repetition, frequency and presence penalties written out token by token (no shared code)."""
    out = logits.double().clone()
    for token, bias in params.logit_bias:
        out[token] += bias
    counts = {}
    for token in generated:
        counts[token] = counts.get(token, 0) + 1
    for token in set(prompt) | set(generated):
        value = float(out[token])
        out[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
    for token, count in counts.items():
        out[token] -= params.frequency_penalty * count + params.presence_penalty
    return out


PENALTIES = [
    SamplingParams(presence_penalty=0.7),
    SamplingParams(frequency_penalty=-0.4),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                   logit_bias=((3, 5.0), (7, -100.0))),
]


@pytest.mark.parametrize("params", PENALTIES)
def test_penalties_and_bias_follow_their_definitions_at_every_tree_row(params):
    logits = _logits(rows=3, vocab=12, seed=4)
    prompt, generated = [1, 2, 2], [2, 5, 5, 9]
    history = TokenHistory(12, prompt)
    history.extend(generated[:2])
    history.extend(generated[2:])
    law = replace(params, history=history)
    paths = [[], [5], [5, 11]]  # the root, a node, its child
    probs = logits_to_probs(logits, law, paths)
    for row, path in enumerate(paths):
        expected = (_penalized_reference(logits[row], prompt, generated + path, params) / params.temperature)
        torch.testing.assert_close(probs[row].double(), expected.softmax(-1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(probs, logits_to_probs(logits, SamplingParams(temperature=params.temperature)))


def test_a_greedy_law_takes_the_argmax_after_penalties():
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    history = TokenHistory(3, [0])
    history.extend([0])
    law = SamplingParams(temperature=0, frequency_penalty=2.0, history=history)
    assert logits_to_probs(logits, law).tolist() == [[0.0, 1.0, 0.0]]  # 5 − 2 < 4


def test_penalties_without_a_history_and_bad_penalties_are_named():
    with pytest.raises(InvalidInputError, match="TokenHistory"):
        logits_to_probs(_logits(), SamplingParams(presence_penalty=0.5))
    with pytest.raises(InvalidInputError, match="vocabulary has 50"):
        logits_to_probs(_logits(), SamplingParams(logit_bias=((50, 1.0),)))
    with pytest.raises(InvalidInputError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(InvalidInputError, match="frequency_penalty"):
        SamplingParams(frequency_penalty="1")
    with pytest.raises(InvalidInputError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(InvalidInputError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias=((1, 101.0),))
    with pytest.raises(InvalidInputError, match="token ids"):
        SamplingParams(logit_bias=((-1, 1.0),))
    with pytest.raises(InvalidInputError, match="twice"):
        SamplingParams(logit_bias=((1, 1.0), (1, 2.0)))


def test_node_paths_walk_up_to_the_root():
    tokens, parents = [10, 11, 12, 13], [-1, 0, -1, 1]
    assert node_paths(tokens, parents, [-1, 0, 3, 2]) == [[], [10], [10, 11, 13], [12]]


def test_token_logprob_reports_the_law_and_its_likeliest_tokens():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    got = token_logprob(probs, 2, top=3)
    assert got.token == 2 and got.logprob == pytest.approx(math.log(0.3))
    assert [token for token, _ in got.top] == [0, 2, 3]
    assert len(token_logprob(torch.tensor([0.0, 1.0, 0.0]), 1, top=5).top) == 1  # only tokens it can emit
