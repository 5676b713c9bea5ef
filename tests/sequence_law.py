"""Exact laws of emitted token sequences, by enumerating every tuple of draft sequences."""

import itertools

import torch

from spectr.tree import DraftTree, merge_drafts
from spectr.walk import walk_law
from tests.lookup import LookupTableLM


def tree_for(text, sequences, target: LookupTableLM, draft: LookupTableLM):
    """The DraftTree of draft sequences [k, L] after `text`, and p at the root and every node."""
    tokens, parents, paths = merge_drafts(torch.tensor(sequences))
    contexts = [(text[-2] if len(text) > 1 else None, text[-1])]
    for node, parent in enumerate(parents.tolist()):
        before = contexts[parent + 1][1]
        contexts.append((before, int(tokens[node])))
    has_children = [True] + [bool((parents == node).any()) for node in range(len(tokens))]
    draft_rows = [draft.next_probs(*c) if kids else torch.zeros(draft.config.vocab_size, dtype=torch.float64)
                  for c, kids in zip(contexts, has_children)]
    target_rows = [target.next_probs(*c) for c in contexts]
    tree = DraftTree(tokens=tokens, parents=parents, paths=paths, draft_probs=torch.stack(draft_rows))
    return tree, torch.stack(target_rows)


def tree_target_rows(text, tree: DraftTree, target: LookupTableLM) -> torch.Tensor:
    """p at the root and at every node of `tree` hung after `text`. [n + 1, V]"""
    contexts = [(text[-2] if len(text) > 1 else None, text[-1])]
    for node, parent in enumerate(tree.parents.tolist()):
        contexts.append((contexts[parent + 1][1], int(tree.tokens[node])))
    return torch.stack([target.next_probs(*c) for c in contexts])


def mixed_first_tokens_law(text, n, target: LookupTableLM, trees, rule) -> dict[tuple[int, ...], float]:
    """The law of the first n tokens when each step's tree comes from trees(text): [(tree, probability)]."""
    law: dict[tuple[int, ...], float] = {}
    for tree, weight in trees(list(text)):
        for emitted, p in walk_law(tree, tree_target_rows(text, tree, target), rule).items():
            if len(emitted) >= n:
                law[emitted[:n]] = law.get(emitted[:n], 0.0) + weight * p
                continue
            for tail, q in mixed_first_tokens_law(list(text) + list(emitted), n - len(emitted), target, trees,
                                                  rule).items():
                law[emitted + tail] = law.get(emitted + tail, 0.0) + weight * p * q
    return law


def sequence_probability(model: LookupTableLM, text, sequence) -> float:
    probability, context = 1.0, list(text)
    for token in sequence:
        probability *= float(model.next_probs(context[-2] if len(context) > 1 else None, context[-1])[token])
        context.append(token)
    return probability


def step_law(text, target, draft, rule, k, length):
    vocab = target.config.vocab_size
    singles = [(seq, sequence_probability(draft, text, seq)) for seq in itertools.product(range(vocab), repeat=length)]
    singles = [(seq, p) for seq, p in singles if p > 0]
    law: dict[tuple[int, ...], float] = {}
    for combo in itertools.product(singles, repeat=k):
        weight = 1.0
        for _, p in combo:
            weight *= p
        tree, target_rows = tree_for(text, [seq for seq, _ in combo], target, draft)
        for emitted, p in walk_law(tree, target_rows, rule).items():
            law[emitted] = law.get(emitted, 0.0) + weight * p
    return law


def first_tokens_law(text, n, target, draft, rule, k, length):
    law: dict[tuple[int, ...], float] = {}
    for emitted, p in step_law(text, target, draft, rule, k, length).items():
        if len(emitted) >= n:
            key = emitted[:n]
            law[key] = law.get(key, 0.0) + p
        else:
            for rest, q in first_tokens_law(text + list(emitted), n - len(emitted), target, draft, rule, k, length).items():
                law[emitted + rest] = law.get(emitted + rest, 0.0) + p * q
    return law


def target_law(text, n, target: LookupTableLM):
    vocab = target.config.vocab_size
    return {seq: sequence_probability(target, text, seq) for seq in itertools.product(range(vocab), repeat=n)}


def assert_same_law(got: dict, expected: dict, atol: float = 1e-9):
    for key in set(got) | set(expected):
        assert abs(got.get(key, 0.0) - expected.get(key, 0.0)) < atol, (key, got.get(key), expected.get(key))
