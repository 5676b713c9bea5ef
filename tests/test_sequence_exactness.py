"""Sequence-level exactness (SPECTR.md §3): the law of the first n emitted tokens equals the target's.

Target and draft are lookup-table models over a tiny vocabulary. Every tuple
of k draft sequences is enumerated with its probability, merged into the tree
the drafter would build, and the walk's exact law (`walk_law`) is mixed over
them, step after step, until n tokens are out.
"""

import pytest
import torch

from spectr.rules import RULES
from spectr.rules.block import BlockPlan
from spectr.tree import DraftTree
from spectr.walk import walk, walk_law
from tests.lookup import LookupTableLM
from tests.sequence_law import assert_same_law, first_tokens_law, mixed_first_tokens_law, target_law, tree_for
from tests.stats import P_VALUE_THRESHOLD, chi_square_pvalue

PROMPT = [0, 2]
FIRST_TOKENS = 3


CASES = [  # (rule, k, L, vocab): V = 3 only where V = 4 would enumerate 4^(k·L) = 4096 tuples per step
    ("standard", 1, 1, 4), ("standard", 1, 2, 4),
    ("kseq", 1, 2, 4), ("kseq", 2, 1, 4), ("kseq", 2, 2, 4), ("kseq", 3, 1, 4), ("kseq", 3, 2, 3),
    ("specinfer", 2, 2, 4), ("specinfer", 3, 1, 4),
    ("rsd", 2, 2, 4), ("rsd", 3, 1, 4),
    ("importance", 2, 1, 4), ("importance", 2, 2, 4), ("importance", 3, 2, 3),
    ("block", 1, 1, 4), ("block", 1, 2, 4), ("block", 1, 3, 4), ("block", 1, 4, 3),
]


@pytest.mark.parametrize("rule_name,k,length,vocab", CASES)
def test_first_tokens_follow_the_target(rule_name, k, length, vocab):
    target = LookupTableLM.random(vocab, seed=1)
    draft = LookupTableLM.random(vocab, seed=2)
    got = first_tokens_law(PROMPT, FIRST_TOKENS, target, draft, RULES[rule_name], k, length)
    assert_same_law(got, target_law(PROMPT, FIRST_TOKENS, target))


def test_a_walk_that_does_not_shrink_the_candidates_fails(monkeypatch):
    """Negative control: offering every draft's token at a depth, not just the consistent ones."""

    def every_draft(self, context):
        length = self.paths.shape[1]
        depth = 0 if context < 0 else int(self.depths[context])
        return self.tokens[self.paths[:, depth]] if depth < length else torch.empty(0, dtype=torch.long)

    monkeypatch.setattr(DraftTree, "candidates", every_draft)
    target = LookupTableLM.random(3, seed=1)
    draft = LookupTableLM.random(3, seed=2)
    got = first_tokens_law(PROMPT, FIRST_TOKENS, target, draft, RULES["kseq"], 2, 2)
    expected = target_law(PROMPT, FIRST_TOKENS, target)
    assert max(abs(got.get(key, 0.0) - expected[key]) for key in expected) > 1e-3


class BlockWithoutResidualMass:
    """Wrong on purpose: block verification with h_i = w_i (the residual mass s_i left out of the stop test)."""

    name, path_level = "block-wrong-stop", True

    def path_plan(self, target_probs, draft_probs, tokens):
        plan = RULES["block"].path_plan(target_probs, draft_probs, tokens)
        weights = [1.0]
        for i, token in enumerate(tokens.tolist()):
            weights.append(min(1.0, weights[-1] * float(target_probs[i, token] / draft_probs[i, token])))
        stop = torch.tensor(weights, dtype=plan.stop_probs.dtype)
        return BlockPlan(stop_probs=stop, residual_probs=plan.residual_probs)


def test_block_verification_with_a_wrong_stop_test_fails():
    target = LookupTableLM.random(4, seed=1)
    draft = LookupTableLM.random(4, seed=2)
    got = first_tokens_law(PROMPT, FIRST_TOKENS, target, draft, BlockWithoutResidualMass(), 1, 2)
    expected = target_law(PROMPT, FIRST_TOKENS, target)
    assert max(abs(got.get(key, 0.0) - expected[key]) for key in expected) > 1e-3


def test_walk_samples_follow_walk_law():
    """The sampling walk has the law walk_law computes (chi-square over emitted sequences)."""
    target = LookupTableLM.random(4, seed=1)
    draft = LookupTableLM.random(4, seed=2)
    tree, target_rows = tree_for(PROMPT, [[1, 2], [1, 3], [0, 2]], target, draft)
    tree.draft_probs, target_rows = tree.draft_probs.float(), target_rows.float()
    law = walk_law(tree, target_rows, RULES["kseq"])
    keys = sorted(law)
    index = {key: i for i, key in enumerate(keys)}
    generator = torch.Generator().manual_seed(5)
    samples = torch.tensor([index[tuple(walk(tree, target_rows, RULES["kseq"], generator)[0])] for _ in range(8_000)])
    assert chi_square_pvalue(samples, torch.tensor([law[key] for key in keys], dtype=torch.float64)) > P_VALUE_THRESHOLD


@pytest.mark.parametrize("k,length", [(1, 2), (3, 2)])
def test_ngram_drafts_keep_the_target_law(k, length):
    """Point-mass (n-gram) drafts: the prompt repeats, so trees with several branches really occur."""
    from spectr.drafters import NgramDrafter

    target = LookupTableLM.random(4, seed=1)
    prompt = [0, 1, 2, 0, 1, 3, 0, 1]
    drafter = NgramDrafter()
    assert drafter.propose(prompt, 3, 2, None, None).num_nodes >= 3
    got = mixed_first_tokens_law(prompt, 4, target, lambda text: [(drafter.propose(text, k, length, None, None), 1.0)],
                                 RULES["kseq"])
    assert_same_law(got, target_law(prompt, 4, target))
