"""Batched rules equal the single-node reference; seeded calls repeat bit for bit."""

import pytest
import torch

from spectr.rules import RULES, kseq_rho_star

NODES = 16


def _batch(vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    alpha = torch.full((NODES, vocab), 0.4, dtype=torch.float64)
    target = torch._standard_gamma(alpha, generator=generator) + 1e-12
    draft = torch._standard_gamma(alpha, generator=generator) + 1e-12
    return target / target.sum(-1, keepdim=True), draft / draft.sum(-1, keepdim=True)


@pytest.mark.parametrize("rule_name,k", [("standard", 1), ("kseq", 3), ("specinfer", 3), ("rsd", 3)])
def test_batch_equals_one_node_at_a_time(rule_name, k):
    rule = RULES[rule_name]
    target, draft = _batch(vocab=9, seed=k)
    candidates = rule.draw_candidates_batch(draft, k, torch.Generator().manual_seed(0))
    laws, accepts = rule.output_law_batch(target, draft, candidates)
    for node in range(NODES):
        law, accept = rule.output_law(target[node], draft[node], candidates[node])
        torch.testing.assert_close(laws[node], law, atol=1e-12, rtol=0)
        assert float(accepts[node]) == pytest.approx(accept, abs=1e-12)


def test_rho_star_batch_with_per_node_k():
    target, draft = _batch(vocab=12, seed=5)
    k = torch.arange(1, NODES + 1) % 5 + 1
    batched = kseq_rho_star(target, draft, k)
    for node in range(NODES):
        single = RULES["kseq"].rho_star(target[node], draft[node], int(k[node]))
        assert float(batched[node]) == single  # a node's ρ does not depend on its batch


@pytest.mark.parametrize("rule_name,k", [("standard", 1), ("kseq", 4), ("specinfer", 4), ("rsd", 4)])
def test_seeded_calls_repeat_bit_for_bit(rule_name, k):
    rule = RULES[rule_name]
    target, draft = _batch(vocab=50, seed=1)
    target, draft = target.float(), draft.float()

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        candidates = rule.draw_candidates_batch(draft, k, generator)
        tokens, accepted = rule.select_batch(target, draft, candidates, generator)
        one = rule.draw_candidates(draft[0], k, generator)
        token, took = rule.select(target[0], draft[0], one, generator)
        return candidates, tokens, accepted, one, token, took

    first, second, other = run(42), run(42), run(43)
    for a, b in zip(first, second):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert not all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(first, other))
