"""Goodness-of-fit helpers shared by the statistical exactness tests."""

import numpy as np
import scipy.stats
from torch import Tensor

# Every statistical test in the suite is seeded; this threshold is what a wrong rule
# (the negative controls) must fall below, and a right one must stay above.
P_VALUE_THRESHOLD = 1e-4


def chi_square_pvalue(samples: Tensor, probs: Tensor) -> float:
    """p-value of `samples` (ints in [0, V)) being drawn from `probs` [V].

    A sample of a zero-probability outcome gives 0. Outcomes expected fewer than
    5 times are pooled into one cell so the chi-square approximation holds.
    """
    probs = probs.double().numpy()
    counts = np.bincount(samples.numpy(), minlength=probs.size).astype(float)
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    small = (expected < 5) & (probs > 0)
    big = expected >= 5
    observed = np.append(counts[big], counts[small].sum()) if small.any() else counts[big]
    wanted = np.append(expected[big], expected[small].sum()) if small.any() else expected[big]
    if observed.size < 2:
        return 1.0
    return float(scipy.stats.chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue)


def binomial_z(successes: int, trials: int, probability: float) -> float:
    """How many standard deviations `successes` is from trials·probability."""
    spread = (trials * probability * (1 - probability)) ** 0.5
    gap = abs(successes - trials * probability)
    return 0.0 if gap < 1e-9 else gap / max(spread, 1e-12)


def pooled_chi_square_pvalue(outcomes: Tensor, probs: Tensor) -> float:
    """p-value of independent-given-the-past draws outcomes [n] (in [0, C)) having laws probs [n, C].

    Counts minus their expectation, over the categories that carry mass, against their exact
    covariance: (O − E)ᵀ Σ⁻¹ (O − E) is asymptotically chi-square with (cells − 1) degrees of freedom.
    """
    probs = probs.numpy()
    counts = np.bincount(outcomes.numpy(), minlength=probs.shape[1]).astype(float)
    cells = probs.sum(0) > 5  # categories expected often enough for the normal approximation
    if counts[~cells].sum() > probs[:, ~cells].sum() + 5 * np.sqrt(max(probs[:, ~cells].sum(), 1.0)):
        return 0.0  # far too many draws in categories that should be (nearly) empty
    kept = np.flatnonzero(cells)[:-1]  # one cell is implied by the others
    if kept.size == 0:
        return 1.0
    gap = counts[kept] - probs[:, kept].sum(0)
    covariance = np.diag(probs[:, kept].sum(0)) - probs[:, kept].T @ probs[:, kept]
    statistic = float(gap @ np.linalg.solve(covariance, gap))
    return float(scipy.stats.chi2.sf(statistic, kept.size))
