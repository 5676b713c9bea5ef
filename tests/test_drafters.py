"""Drafters build the trees the decoder expects."""

import torch

from spectr.drafters import ModelDrafter, NgramDrafter
from spectr.processing import SamplingParams
from spectr.tree import merge_drafts
from tests.lookup import LookupTableLM


def test_merge_drafts_shares_prefixes():
    tokens, parents, paths = merge_drafts(torch.tensor([[5, 6, 1], [5, 7, 1], [8, 6, 2], [5, 6, 1]]))
    assert tokens.tolist() == [5, 8, 6, 7, 6, 1, 1, 2]
    assert parents.tolist() == [-1, -1, 0, 0, 1, 2, 3, 4]
    assert paths.tolist() == [[0, 2, 5], [0, 3, 6], [1, 4, 7], [0, 2, 5]]


def test_ngram_finds_distinct_continuations_most_recent_first():
    drafter = NgramDrafter(max_ngram=2)
    text = [1, 2, 3, 9, 1, 2, 4, 1, 2]
    assert drafter.continuations(text, 3, 2) == [[4, 1], [3, 9]]
    assert drafter.continuations(text, 1, 2) == [[4, 1]]
    assert drafter.continuations([1, 2, 3], 2, 2) == []
    assert drafter.propose([1, 2, 3], 2, 2, SamplingParams(), None).num_nodes == 0


def test_model_drafter_tree_matches_its_draft_distributions():
    draft = LookupTableLM.random(5, seed=3)
    drafter = ModelDrafter(draft)
    drafter.reset(64)
    text = [0, 1, 2]
    tree = drafter.propose(text, 4, 3, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    assert tree.paths.shape == (4, 3)
    torch.testing.assert_close(tree.draft_probs[0].double(), draft.next_probs(1, 2), atol=1e-6, rtol=0)
    for node, parent in enumerate(tree.parents.tolist()):
        if tree.depths[node] < 3:  # q below every non-leaf node, from its own context
            before = int(tree.tokens[parent]) if parent >= 0 else text[-1]
            expected = draft.next_probs(before, int(tree.tokens[node]))
            torch.testing.assert_close(tree.draft_probs[1 + node].double(), expected, atol=1e-6, rtol=0)
