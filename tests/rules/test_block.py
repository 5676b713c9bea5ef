"""Block verification (rules/block.py): the paper's example, never worse than token-wise, L = 1 is standard,
edge cases, and a sampler that follows the exact law. Sequence-level exactness: tests/test_sequence_exactness.py."""

import itertools

import pytest
import torch

from spectr.rules import RULES
from spectr.rules.block import BlockPlan, block_plan
from spectr.tree import DraftTree
from spectr.walk import walk, walk_law
from tests.lookup import LookupTableLM
from tests.rules.cases import distribution_pairs
from tests.sequence_law import step_law, tree_for
from tests.stats import P_VALUE_THRESHOLD, chi_square_pvalue

BLOCK, STANDARD = RULES["block"], RULES["standard"]


def path_tree(path: list[int], target: torch.Tensor, draft: torch.Tensor) -> tuple[DraftTree, torch.Tensor]:
    """One draft path under context-free laws p, q [V]: the tree and p at the root and every node."""
    length = len(path)
    tree = DraftTree(
        tokens=torch.tensor(path), parents=torch.arange(-1, length - 1), paths=torch.arange(length)[None],
        draft_probs=torch.cat([draft.expand(length, -1), torch.zeros(1, draft.shape[0], dtype=draft.dtype)]),
    )
    return tree, target.expand(length + 1, -1)


def expected_accepted(rule, target, draft, length) -> float:
    """Mean draft tokens kept a step over context-free laws, every draft path enumerated."""
    total = 0.0
    for path in itertools.product(range(target.shape[0]), repeat=length):
        weight = float(draft[list(path)].prod())
        if weight == 0:
            continue
        tree, target_rows = path_tree(list(path), target, draft)
        for emitted, chance in walk_law(tree, target_rows, rule).items():
            total += weight * chance * (len(emitted) - 1)
    return total


def test_the_papers_example():
    """Sun et al. §1: p = (1/3, 2/3), q = (2/3, 1/3), two draft tokens: token-wise 10/9, block 11/9."""
    target = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    draft = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    assert expected_accepted(STANDARD, target, draft, 2) == pytest.approx(10 / 9, abs=1e-12)
    assert expected_accepted(BLOCK, target, draft, 2) == pytest.approx(11 / 9, abs=1e-12)


def test_one_draft_token_is_the_standard_rule():
    for case, target, draft in distribution_pairs(5):
        for token in torch.nonzero(draft > 0).flatten().tolist():
            plan = block_plan(target[None], draft[None], torch.tensor([token]))
            standard = STANDARD.plan(target[None], draft[None], torch.tensor([[token]]))
            torch.testing.assert_close(plan.stop_probs[1:], standard.accept_probs[0], atol=1e-12, rtol=0, msg=case)
            torch.testing.assert_close(plan.residual_probs, standard.residual_probs, atol=1e-12, rtol=0, msg=case)


@pytest.mark.parametrize("seed", range(4))
def test_never_keeps_fewer_tokens_than_token_wise(seed):
    """The paper's guarantee, on context-dependent laws (a tiny lookup language), L = 3."""
    target, draft = LookupTableLM.random(3, seed=seed), LookupTableLM.random(3, seed=seed + 10)

    def mean_kept(rule):
        return sum(p * (len(emitted) - 1) for emitted, p in step_law([0, 1], target, draft, rule, 1, 3).items())

    block, standard = mean_kept(BLOCK), mean_kept(STANDARD)
    assert block >= standard - 1e-12
    assert block > standard + 1e-4  # and strictly better here: the test can tell them apart


def test_a_perfect_draft_keeps_the_whole_path():
    target = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    plan = block_plan(target.expand(3, -1), target.expand(3, -1), torch.tensor([1, 0, 2]))
    assert plan.stop_law().tolist() == [0.0, 0.0, 0.0, 1.0]


def test_a_token_the_target_never_says_stops_the_path_there():
    """p(X_2) = 0: no prefix through X_2 can be kept, whatever comes after."""
    target, draft = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    plan = block_plan(target.expand(3, -1), draft.expand(3, -1), torch.tensor([0, 2, 1]))
    law = plan.stop_law()
    assert float(law[2:].sum()) == 0.0 and float(law.sum()) == pytest.approx(1.0, abs=1e-12)


def test_stop_law_is_a_distribution():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        target = torch.rand(4, 6, generator=generator, dtype=torch.float64) ** 3
        draft = torch.rand(4, 6, generator=generator, dtype=torch.float64) ** 3
        target, draft = target / target.sum(-1, keepdim=True), draft / draft.sum(-1, keepdim=True)
        plan: BlockPlan = block_plan(target, draft, torch.randint(0, 6, (4,), generator=generator))
        assert float(plan.stop_law().sum()) == pytest.approx(1.0, abs=1e-12)
        assert bool((plan.stop_probs >= 0).all() and (plan.stop_probs <= 1).all())


def test_samples_follow_the_exact_law():
    target, draft = LookupTableLM.random(4, seed=1), LookupTableLM.random(4, seed=2)
    tree, target_rows = tree_for([0, 2], [[1, 3, 2]], target, draft)
    tree.draft_probs, target_rows = tree.draft_probs.float(), target_rows.float()
    law = walk_law(tree, target_rows, BLOCK)
    keys = sorted(law)
    index = {key: i for i, key in enumerate(keys)}
    generator = torch.Generator().manual_seed(3)
    samples = torch.tensor([index[tuple(walk(tree, target_rows, BLOCK, generator)[0])] for _ in range(8_000)])
    assert chi_square_pvalue(samples, torch.tensor([law[key] for key in keys], dtype=torch.float64)) > P_VALUE_THRESHOLD


def test_a_tree_of_several_drafts_is_refused():
    target, draft = LookupTableLM.random(3, seed=1), LookupTableLM.random(3, seed=2)
    tree, target_rows = tree_for([0, 1], [[1, 2], [2, 0]], target, draft)
    with pytest.raises(ValueError, match="judges one draft path"):
        walk(tree, target_rows, BLOCK, torch.Generator().manual_seed(0))
