"""Dynamic draft trees (drafters/dynamic.py): which nodes are kept, the exact law of what they emit, greedy
equality with plain decoding, the drafter caches they leave behind, and the settings that ask for them."""

import pytest
import torch

from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters import EagleDrafter, ModelDrafter
from spectr.drafters.dynamic import grow_dynamic_tree, leaf_paths
from spectr.errors import InvalidInputError
from spectr.models import native_forward
from spectr.processing import SamplingParams
from spectr.rules import RULES
from tests.decoder_law import check_decoder_law, law_target, perturbed_copy
from tests.lookup import LookupTableLM
from tests.models.tiny import tiny_model
from tests.sequence_law import assert_same_law, mixed_first_tokens_law, target_law
from tests.stats import P_VALUE_THRESHOLD


def lookup_forward(draft: LookupTableLM, root_context):
    """forward_nodes for grow_dynamic_tree over a lookup draft: a run node's law from its (parent, token)."""
    run_context: list[tuple[int | None, int]] = []

    def forward_nodes(new, tokens, parents, level):
        rows = []
        for node in new.tolist():
            before = root_context[1] if parents[node] < 0 else tokens[parents[node]]
            run_context.append((before, tokens[node]))
            rows.append(draft.next_probs(before, tokens[node]))
        return torch.stack(rows)

    return forward_nodes


def brute_force_scores(draft: LookupTableLM, text, width: int, depth: int) -> dict[tuple[int, ...], float]:
    """Every path the growth can reach, with its score, by the rule written out level by level."""
    root = draft.next_probs(text[-2], text[-1])
    level = {(t,): float(root[t]) for t in root.topk(width).indices.tolist() if root[t] > 0}
    everything = dict(level)
    for _ in range(depth - 1):
        expand = sorted(level, key=lambda path: -level[path])[:width]
        level = {}
        for path in expand:
            probs = draft.next_probs(path[-2] if len(path) > 1 else text[-1], path[-1])
            for t in probs.topk(width).indices.tolist():
                if probs[t] > 0:
                    level[path + (t,)] = level_score = everything[path] * float(probs[t])
                    everything[path + (t,)] = level_score
    return everything


@pytest.mark.parametrize("width,depth,budget", [(1, 3, 3), (2, 3, 5), (3, 2, 12), (3, 4, 7)])
def test_the_kept_nodes_are_the_most_confident_paths(width, depth, budget):
    draft = LookupTableLM.random(5, seed=3)
    text = [0, 2]
    root = draft.next_probs(text[-2], text[-1])
    tree, slots = grow_dynamic_tree(root, width, depth, budget, lookup_forward(draft, (text[-2], text[-1])))
    scores = brute_force_scores(draft, text, width, depth)
    paths = []
    for node in range(tree.num_nodes):
        path, walker = [], node
        while walker >= 0:
            path.append(int(tree.tokens[walker]))
            walker = int(tree.parents[walker])
        paths.append(tuple(reversed(path)))
    best = sorted(scores.values(), reverse=True)[: min(budget, len(scores))]
    assert sorted((scores[p] for p in paths), reverse=True) == pytest.approx(best, abs=1e-12)
    assert len(set(paths)) == len(paths) <= budget
    depths = tree.depths.tolist()
    assert all(parent < node for node, parent in enumerate(tree.parents.tolist()))  # parents first
    assert depths == sorted(depths) and max(depths) <= depth
    run = [node for node in range(tree.num_nodes) if slots[node] >= 0]
    assert all(slots[int(tree.parents[node])] >= 0 for node in range(tree.num_nodes) if tree.parents[node] >= 0)
    assert len({slots[node] for node in run}) == len(run)


def test_leaf_paths():
    assert leaf_paths([-1, -1, 0, 2, 0]).tolist() == [[1, -1, -1], [0, 2, 3], [0, 4, -1]]
    assert leaf_paths([]).shape == (0, 0)


def dynamic_trees(draft: LookupTableLM, width: int, depth: int, budget: int):
    """trees(text) for mixed_first_tokens_law: the one dynamic tree the model drafter grows after `text`."""

    def trees(text):
        drafter = ModelDrafter(draft)
        drafter.reset(64)
        return [(drafter.propose(text, width, depth, SamplingParams(temperature=1.0), None, tree="dynamic",
                                 budget=budget), 1.0)]

    return trees


@pytest.mark.parametrize("width,depth,budget", [(1, 2, 2), (2, 2, 3), (2, 3, 6), (3, 2, 9)])
def test_first_tokens_follow_the_target(width, depth, budget):
    target, draft = LookupTableLM.random(4, seed=1), LookupTableLM.random(4, seed=2)
    got = mixed_first_tokens_law([0, 2], 4, target, dynamic_trees(draft, width, depth, budget), RULES["kseq"])
    assert_same_law(got, target_law([0, 2], 4, target))


@pytest.fixture(scope="module")
def target_and_draft():
    hf = tiny_model("llama-gqa", seed=0, initializer_range=0.3)
    return native_forward(hf, "fp32"), perturbed_copy(hf, sharpen=1.0, noise=0.02)


@pytest.mark.parametrize("width,depth,budget", [(1, 4, 4), (2, 3, 5), (4, 4, 12)])
def test_greedy_equals_plain_greedy(target_and_draft, width, depth, budget):
    target, draft = target_and_draft
    greedy, prompt = SamplingParams(temperature=0), [3, 17, 42, 8, 25, 3, 17]
    plain = [t for s in Decoder(target, None, DecodeSettings(method="ar"), greedy).stream(
        prompt, 40, torch.Generator().manual_seed(0)) for t in s.emitted]
    settings = DecodeSettings(k=width, length=depth, tree="dynamic", budget=budget)
    steps = list(Decoder(target, ModelDrafter(draft), settings, greedy).stream(prompt, 40, torch.Generator()))
    assert [t for s in steps for t in s.emitted] == plain
    assert sum(s.accepted for s in steps) > len(steps)  # the tree was followed, more than a token a step
    assert all(s.tree_nodes <= budget for s in steps)


def test_every_token_follows_the_target_with_both_drafters(tmp_path):
    """The decoder's law over long generations (tests/decoder_law.py), model drafter and EAGLE head."""
    from spectr.drafters.trained import load_trained_draft
    from tests.decoder_law import sharpened_head

    hf = law_target()
    target = native_forward(hf, "fp32")
    head = load_trained_draft(sharpened_head(hf, tmp_path), hf, precision="fp32")
    settings = DecodeSettings(k=2, length=3, tree="dynamic", budget=5)
    for drafter in (ModelDrafter(perturbed_copy(hf)), EagleDrafter(head)):
        exact = check_decoder_law(target, drafter, settings, SamplingParams(temperature=0.7), streams=15)
        assert exact.accepted > exact.steps and exact.pvalue > P_VALUE_THRESHOLD, exact


def test_settings():
    assert DecodeSettings(k=2, length=3, tree="dynamic").node_budget == 6
    assert DecodeSettings(k=2, length=3, tree="dynamic", budget=10).tree_size == 10
    assert DecodeSettings(k=2, length=3).node_budget is None
    with pytest.raises(InvalidInputError, match="tree must be one of"):
        DecodeSettings(tree="bushy")
    with pytest.raises(InvalidInputError, match="does not apply to a dynamic tree"):
        DecodeSettings(tree="dynamic", rule="kseq")
    with pytest.raises(InvalidInputError, match="needs tree 'dynamic'"):
        DecodeSettings(budget=4)
    with pytest.raises(InvalidInputError, match="budget must be an int"):
        DecodeSettings(tree="dynamic", budget=0)
