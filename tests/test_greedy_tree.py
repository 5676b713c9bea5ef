"""Greedy trees (drafters/greedy.py): k − 1 chosen children and one drawn from the rest a level. The exact law of
what they emit (every draw enumerated), the decoder's law with both drafters, greedy equality, settings."""

import itertools

import pytest
import torch

from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters import EagleDrafter, ModelDrafter
from spectr.drafters import greedy as greedy_module
from spectr.drafters.greedy import grow_greedy_tree
from spectr.errors import InvalidInputError
from spectr.models import native_forward
from spectr.processing import SamplingParams
from spectr.rules import RULES
from tests.decoder_law import check_decoder_law, law_target, perturbed_copy
from tests.lookup import LookupTableLM
from tests.models.tiny import tiny_model
from tests.sequence_law import assert_same_law, mixed_first_tokens_law, target_law
from tests.stats import P_VALUE_THRESHOLD


def trees_with_weights(text, draft: LookupTableLM, k: int, length: int, monkeypatch):
    """Every greedy tree the builder can make after `text`, with its probability: the drawn child of each level
    enumerated through a stand-in sampler that returns the given tokens and records their chances."""
    vocab = draft.config.vocab_size
    for draws in itertools.product(range(vocab), repeat=length):
        pending, weight = list(draws), [1.0]

        def fake_sample(probs, generator, num_samples=1):
            token = pending.pop(0)
            weight[0] *= float(probs[0, token])
            return torch.tensor([[token]])

        monkeypatch.setattr(greedy_module, "sample_categorical", fake_sample)

        def forward_nodes(new, tokens, parents, level):
            node = int(new[0])
            before = text[-1] if parents[node] < 0 else tokens[parents[node]]
            return draft.next_probs(before, tokens[node])[None]

        tree, _ = grow_greedy_tree(draft.next_probs(text[-2], text[-1]), k, length, None, forward_nodes)
        if weight[0] > 0 and not pending:
            yield tree, weight[0]
        elif weight[0] > 0 and pending:  # fewer levels drew than given: count each such tree once
            if all(t == 0 for t in pending):
                yield tree, weight[0]


def greedy_first_tokens_law(text, n, target, draft, k, length, monkeypatch):
    return mixed_first_tokens_law(text, n, target, lambda t: trees_with_weights(t, draft, k, length, monkeypatch),
                                  RULES["standard"])


@pytest.mark.parametrize("k,length", [(1, 2), (2, 1), (2, 2), (3, 2)])
def test_first_tokens_follow_the_target(k, length, monkeypatch):
    target, draft = LookupTableLM.random(4, seed=1), LookupTableLM.random(4, seed=2)
    got = greedy_first_tokens_law([0, 2], 3, target, draft, k, length, monkeypatch)
    assert_same_law(got, target_law([0, 2], 3, target))


def test_drawing_from_q_instead_of_q_prime_fails(monkeypatch):
    """Negative control: the drawn child judged against q (not q' without the chosen tokens) is biased."""
    target, draft = LookupTableLM.random(4, seed=1), LookupTableLM.random(4, seed=2)
    real = grow_greedy_tree

    def with_q_rows(root_probs, k, length, generator, forward_nodes):
        tree, slots = real(root_probs, k, length, generator, forward_nodes)
        tree.draft_probs[0] = root_probs  # claims the root's drawn child came from q itself
        return tree, slots

    monkeypatch.setattr(sys_module(), "grow_greedy_tree", with_q_rows)
    got = greedy_first_tokens_law([0, 2], 2, target, draft, 3, 1, monkeypatch)
    expected = target_law([0, 2], 2, target)
    assert max(abs(got.get(key, 0.0) - expected[key]) for key in expected) > 1e-3


def sys_module():
    import sys

    return sys.modules[__name__]


def test_shape_of_the_tree():
    draft = LookupTableLM.random(6, seed=3)

    def forward_nodes(new, tokens, parents, level):
        node = int(new[0])
        return draft.next_probs(None if parents[node] < 0 else tokens[parents[node]], tokens[node])[None]

    tree, slots = grow_greedy_tree(draft.next_probs(None, 1), 3, 3, torch.Generator().manual_seed(0), forward_nodes)
    assert tree.num_nodes == 9 and int(tree.sampled.sum()) == 3  # 2 chosen + 1 drawn a level
    root_children = (tree.parents == -1).nonzero().flatten()
    chosen = tree.tokens[root_children[~tree.sampled[root_children]]]
    assert chosen.tolist() == draft.next_probs(None, 1).topk(2).indices.tolist()
    drawn = int(tree.tokens[root_children[tree.sampled[root_children]]])
    assert drawn not in chosen.tolist() and float(tree.draft_probs[0][chosen].sum()) == 0.0
    assert [slots[n] for n in range(tree.num_nodes) if slots[n] >= 0] == [0, 1]  # the spine ran, two nodes


@pytest.fixture(scope="module")
def target_and_draft():
    hf = tiny_model("llama-gqa", seed=0, initializer_range=0.3)
    return native_forward(hf, "fp32"), perturbed_copy(hf, sharpen=1.0, noise=0.02)


@pytest.mark.parametrize("k,length", [(1, 3), (2, 3), (4, 4)])
def test_greedy_equals_plain_greedy(target_and_draft, k, length):
    target, draft = target_and_draft
    greedy, prompt = SamplingParams(temperature=0), [3, 17, 42, 8, 25, 3, 17]
    plain = [t for s in Decoder(target, None, DecodeSettings(method="ar"), greedy).stream(
        prompt, 40, torch.Generator().manual_seed(0)) for t in s.emitted]
    steps = list(Decoder(target, ModelDrafter(draft), DecodeSettings(k=k, length=length, tree="greedy"),
                         greedy).stream(prompt, 40, torch.Generator().manual_seed(0)))
    assert [t for s in steps for t in s.emitted] == plain
    assert sum(s.accepted for s in steps) > len(steps) / 2


def test_every_token_follows_the_target_with_both_drafters(tmp_path):
    from spectr.drafters.trained import load_trained_draft
    from tests.decoder_law import sharpened_head

    hf = law_target()
    target = native_forward(hf, "fp32")
    head = load_trained_draft(sharpened_head(hf, tmp_path), hf, precision="fp32")
    settings = DecodeSettings(k=3, length=3, tree="greedy")
    for drafter in (ModelDrafter(perturbed_copy(hf)), EagleDrafter(head)):
        exact = check_decoder_law(target, drafter, settings, SamplingParams(temperature=0.7), streams=15)
        assert exact.accepted > exact.steps and exact.pvalue > P_VALUE_THRESHOLD, exact


def test_settings():
    assert DecodeSettings(k=3, length=2, tree="greedy").rule_name == "standard"
    assert DecodeSettings(k=3, length=2, tree="greedy", rule="kseq").rule_candidates == 1  # K-SEQ of one: standard
    with pytest.raises(InvalidInputError, match="judges one draft path"):
        DecodeSettings(k=3, length=2, tree="greedy", rule="block")
