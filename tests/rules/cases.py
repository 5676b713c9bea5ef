"""Hand-made and random (target, draft) pairs that stress the rules' edge cases."""

import torch
from torch import Tensor

from spectr.rules import Rule


def _normalized(values: list[float]) -> Tensor:
    tensor = torch.tensor(values, dtype=torch.float64)
    return tensor / tensor.sum()


def one_hot(vocab: int, token: int) -> Tensor:
    return torch.nn.functional.one_hot(torch.tensor(token), vocab).double()


def distribution_pairs(vocab: int, num_random: int = 24, seed: int = 0) -> list[tuple[str, Tensor, Tensor]]:
    """Dozens of (name, target_probs, draft_probs) pairs over `vocab` tokens, float64."""
    generator = torch.Generator().manual_seed(seed + vocab)
    uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    ramp = _normalized([i + 1.0 for i in range(vocab)])
    half = max(1, vocab // 2)
    low_half = _normalized([1.0] * half + [0.0] * (vocab - half))
    high_half = _normalized([0.0] * half + [1.0] * (vocab - half)) if vocab > half else one_hot(vocab, 0)
    pairs = [
        ("p=q uniform", uniform, uniform),
        ("p=q ramp", ramp, ramp),
        ("one-hot p", one_hot(vocab, 0), uniform),
        ("one-hot q (n-gram draft)", ramp, one_hot(vocab, vocab - 1)),
        ("one-hot q on p's mode", ramp, one_hot(vocab, 0)),
        ("one-hot p = one-hot q", one_hot(vocab, 1), one_hot(vocab, 1)),
        ("disjoint one-hots", one_hot(vocab, 0), one_hot(vocab, 1)),
        ("disjoint supports", low_half, high_half),
        ("q zero where p > 0", uniform, low_half),
        ("p zero where q > 0", low_half, uniform),
        ("reversed ramps", ramp, ramp.flip(0)),
        ("peaked p, flat q", _normalized([50.0] + [1.0] * (vocab - 1)), uniform),
    ]
    for i in range(num_random):
        concentration = [0.1, 0.5, 1.0, 5.0][i % 4]
        alpha = torch.full((vocab,), concentration, dtype=torch.float64)
        target = torch._standard_gamma(alpha, generator=generator)
        draft = torch._standard_gamma(alpha, generator=generator)
        if i % 3 == 1:  # exact zeros in one of the two
            (target if i % 2 else draft)[i % vocab] = 0.0
        if target.sum() == 0 or draft.sum() == 0:
            continue
        pairs.append((f"dirichlet({concentration}) #{i}", target / target.sum(), draft / draft.sum()))
    return pairs


def exact_output_law(rule: Rule, target_probs: Tensor, draft_probs: Tensor, k: int) -> tuple[Tensor, float]:
    """The law of the emitted token, mixing the rule's exact law over every candidate tuple.

    Returns (law [V], acceptance probability), in float64.
    """
    tuples, weights = rule.candidate_law(draft_probs, k)  # [M, k], [M]
    count = tuples.shape[0]
    laws, accepts = rule.output_law_batch(
        target_probs.expand(count, -1), draft_probs.expand(count, -1), tuples
    )
    return (weights[:, None] * laws).sum(0), float((weights * accepts).sum())
