"""The `auto` shape: how many tokens to draft each step, from measured cost and measured acceptance.

Speculation pays only when the tokens a step is expected to emit outweigh what
the step costs on this machine. So `auto` keeps two things:

- a cost profile, measured once per machine, model and draft and cached on disk:
  the target's forward time over n = 1..L + 1 new tokens (the root and a path
  of L draft tokens) on a cached context, and the draft's time to propose a
  path of L tokens, on a short context and on a long one (at long contexts
  reading the cache is what a step costs, and a draft that reads less of it,
  SparQ's, gains on the target), the cost at a step's context read off the
  line through the two;
- a running estimate of the draft's acceptance at each depth j: the chance
  Σ min(p, q) that a draft token is kept there, read at every depth the walk
  reached (an expectation, so far less noisy than counting accepts), as an
  exponential average that follows the text's changing difficulty.

Each step it drafts the path length L ∈ {0, …, L_max} that maximises
    expected tokens / seconds = (1 + Σ_{j ≤ L} Π_{i ≤ j} a_i) / (draft(L) + target(L + 1)),
where L = 0 is a plain autoregressive step (no draft at all). While plain steps
win it still drafts one token now and then — after `EXPLORE_EVERY` plain steps,
then twice as many each time drafting still loses, up to `EXPLORE_AT_MOST` —
so that a draft which starts to agree with the target is noticed. Paths are verified by block
verification (rules/block.py; never fewer tokens than token-wise).

Every choice depends only on what earlier steps observed, never on the random
draws of the step it shapes, so each emitted token still has the target's law;
with a given profile a seeded run makes the same choices and the same text.
"""

from collections import Counter
from dataclasses import asdict, dataclass
import hashlib
import json
from pathlib import Path
import time

import torch

from spectr.errors import InvalidInputError
from spectr.processing import SamplingParams
from spectr.tree import tree_attention_mask, tree_positions

MAX_AUTO_LENGTH = 6  # the longest path `auto` considers: beyond it a step costs more than it can gain here
PRIOR_ACCEPTANCE = 0.4  # the acceptance assumed before anything is observed (≈ the shipped draft's)
PRIOR_WEIGHT = 4.0  # ... worth this many observations
HORIZON = 32.0  # observations the running average remembers (its exponential decay)
EXPLORE_EVERY = 8  # plain steps in a row before one is spent drafting a single token ...
EXPLORE_AT_MOST = 64  # ... an interval that doubles, up to this, while drafting keeps losing


@dataclass(frozen=True)
class CostProfile:
    """Measured seconds: target_seconds[n − 1] a forward over n new tokens; draft_seconds[L − 1] a proposal
    of a path of L tokens, over a cached context of `context` tokens, and the same over `long_context` tokens
    (long_*: empty where not measured). Enough entries for paths of up to `max_length` tokens."""

    target_seconds: tuple[float, ...]
    draft_seconds: tuple[float, ...]
    description: str = ""  # what was measured: target, draft, machine, threads
    context: int = 128
    long_target_seconds: tuple[float, ...] = ()
    long_draft_seconds: tuple[float, ...] = ()
    long_context: int = 0

    @property
    def max_length(self) -> int:
        return min(len(self.target_seconds) - 1, len(self.draft_seconds))

    def step_seconds(self, length: int, context: int | None = None) -> float:
        """A step that drafts `length` tokens (0: a plain step): drafting plus verifying root and path, over
        a context of `context` tokens (None: the short one measured). Between and beyond the two contexts
        measured, on the line through them (attention's cost grows with the context it reads)."""
        short = self.target_seconds[length] + (self.draft_seconds[length - 1] if length else 0.0)
        if context is None or not self.long_context or len(self.long_target_seconds) <= length:
            return short
        long = self.long_target_seconds[length] + (self.long_draft_seconds[length - 1] if length else 0.0)
        share = max(0.0, (context - self.context) / (self.long_context - self.context))
        return max(short + share * (long - short), 0.5 * min(short, long))


# The long context a profile is also measured on (or half the model's context, if less): long enough that
# reading the cache costs a step what it costs at the contexts where it matters (~0.4 of a step here).
LONG_CONTEXT = 2048


def measure_profile(target, drafter, max_length: int = MAX_AUTO_LENGTH, context: int = 128, repeats: int = 7,
                    description: str = "", long_context: int | None = LONG_CONTEXT) -> CostProfile:
    """Time the target over 1..max_length + 1 new tokens and the drafter over paths of 1..max_length on a
    context of `context` tokens, and again on `long_context` tokens (capped at half the model's context;
    None, or no longer than twice `context`: not measured), each the fastest of `repeats` (the machine is
    shared: the minimum is the cost, the rest is noise). The drafter proposes as in decoding: one new text
    token before each proposal."""
    short = _measure_at(target, drafter, max_length, context, repeats)
    draft_config = getattr(getattr(drafter, "lm", None), "config", None)  # a draft model's own context, if any
    long = min(long_context or 0, target.config.context_length // 2,
               getattr(draft_config, "context_length", target.config.context_length) // 2)
    if long <= 2 * context:
        return CostProfile(*short, description, context)
    return CostProfile(*short, description, context, *_measure_at(target, drafter, max_length, long, repeats), long)


def _measure_at(target, drafter, max_length: int, context: int, repeats: int) -> tuple[tuple, tuple]:
    vocab = target.config.vocab_size
    text = [(7 * i + 3) % vocab for i in range(context + max_length * (repeats + 1) + 4)]
    no_rows = torch.tensor([], dtype=torch.long)
    # Room for the target's shapes and, after them, a self-draft's proposals (it drafts in this same cache).
    cache = target.new_cache(len(text) + repeats * max_length + max_length + 2)
    target.forward(torch.tensor([text[:context]]), torch.arange(context), cache, logit_indices=no_rows)
    target_seconds = []
    for new in range(1, max_length + 2):
        parents = torch.arange(-1, new - 2)  # the root, then a path of new − 1 nodes
        tokens, positions = torch.tensor([text[context : context + new]]), tree_positions(parents, context)
        mask, best = tree_attention_mask(parents, context), float("inf")
        for repeat in range(repeats + 1):  # the first call warms this shape up and is not counted
            start = time.perf_counter()
            target.forward(tokens, positions, cache, mask, logit_indices=torch.tensor([0]))
            if repeat:
                best = min(best, time.perf_counter() - start)
            cache.truncate(context)
        target_seconds.append(best)
    draft_seconds = []
    if drafter is not None:
        params, generator = SamplingParams(temperature=1.0), torch.Generator().manual_seed(0)
        feed = getattr(drafter, "uses_target_features", False)
        drafter.reset(len(text) + max_length + 2)
        shared = None  # a self-draft drafts in the target's cache, which holds the text but the root
        if getattr(drafter, "shares_target_cache", False):
            shared = cache  # holds text[:context] again: each timing above truncated it back
            drafter.attach_cache(shared)
        if feed:
            drafter.observe(_zero_features(drafter, context))
        root = context  # text[: root + 1] ends with the root
        drafter.propose(text[: root + 1], 1, 1, params, generator)  # the context, once
        drafter.commit([])
        for length in range(1, max_length + 1):
            best = float("inf")
            for _ in range(repeats):
                if feed:
                    drafter.observe(_zero_features(drafter, 1))
                if shared is not None:  # the target takes the root in, as a step would
                    target.forward(torch.tensor([[text[root]]]), torch.tensor([root]), shared, logit_indices=no_rows)
                root += 1
                start = time.perf_counter()
                drafter.propose(text[: root + 1], 1, length, params, generator)
                best = min(best, time.perf_counter() - start)
                drafter.commit([])
            draft_seconds.append(best)
    # More tokens never cost less, and a shared machine only ever adds time: where a shorter shape measured
    # above a longer one, the shorter one's reading is the noisy one.
    return tuple(_rising(target_seconds)), tuple(_rising(draft_seconds))


def _rising(seconds: list[float]) -> list[float]:
    """The largest non-decreasing sequence nowhere above `seconds`: each value capped by every later one."""
    out, low = [], float("inf")
    for value in reversed(seconds):
        low = min(low, value)
        out.append(low)
    return out[::-1]


def _zero_features(drafter, count: int) -> torch.Tensor:
    """Stand-in target features for timing a head (their values do not change its cost)."""
    lm = drafter.lm
    layers = len(getattr(drafter, "feature_layers", ()))
    shape = (count, layers, lm.config.hidden_size) if layers else (count, lm.config.hidden_size)
    return torch.zeros(shape, dtype=lm.dtype)


def cached_profile(key: str, measure, refresh: bool = False) -> CostProfile:
    """The profile stored under `key` in spectr's cache folder, measured (and stored) when missing or asked."""
    from spectr.models.gguf import cache_root

    path = cache_root() / "profiles" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if not refresh and path.exists():
        try:
            stored = json.loads(path.read_text())
            return CostProfile(**{key: tuple(value) if isinstance(value, list) else value
                                  for key, value in stored.items()})
        except (ValueError, KeyError, TypeError):
            pass  # a damaged file is measured again
    profile = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(profile), indent=1))
    return profile


class PathPlanner:
    """Chooses each step's path length (0 = a plain step) from a cost profile and observed acceptance."""

    def __init__(self, profile: CostProfile, max_length: int):
        if max_length < 1:
            raise InvalidInputError(f"auto needs a longest path L >= 1, got {max_length}")
        if profile.max_length < max_length:
            raise InvalidInputError(
                f"the cost profile covers paths of up to {profile.max_length} tokens; auto was asked for {max_length}")
        self.profile = profile
        self.max_length = max_length
        self.acceptance = [PRIOR_ACCEPTANCE] * max_length  # a_j, depth j = index + 1
        self.weights = [PRIOR_WEIGHT] * max_length
        self.plain_in_a_row = 0
        self.explore_after = EXPLORE_EVERY
        self.chosen: Counter[int] = Counter()

    def expected_tokens(self, length: int) -> float:
        """1 + Σ_{j ≤ L} Π_{i ≤ j} a_i: the emitted tokens a step of this length is expected to give."""
        total, reach = 1.0, 1.0
        for depth in range(length):
            reach *= self.acceptance[depth]
            total += reach
        return total

    def best_length(self, context: int | None = None) -> int:
        rates = [self.expected_tokens(n) / self.profile.step_seconds(n, context) for n in range(self.max_length + 1)]
        return max(range(len(rates)), key=lambda n: (rates[n], -n))  # ties: the shorter

    def choose(self, context: int | None = None) -> int:
        """This step's path length, for a step over `context` tokens of text."""
        length = self.best_length(context)
        if length:  # drafting pays: look again soon once it stops paying
            self.explore_after = EXPLORE_EVERY
        else:
            self.plain_in_a_row += 1
            if self.plain_in_a_row >= self.explore_after:
                length = 1
                self.explore_after = min(2 * self.explore_after, EXPLORE_AT_MOST)
        if length:
            self.plain_in_a_row = 0
        self.chosen[length] += 1
        return length

    def observe(self, chances: list[float]) -> None:
        """Σ min(p, q) at depths 1, 2, ... of the last path, as far as the walk read them."""
        for depth, chance in enumerate(chances[: self.max_length]):
            weight = min(self.weights[depth] + 1.0, HORIZON)
            self.acceptance[depth] += (chance - self.acceptance[depth]) / weight
            self.weights[depth] = weight
