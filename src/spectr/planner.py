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
    expected tokens / seconds = (1 + Σ_{j ≤ L} Π_{i ≤ j} a_i) / (draft(L) + target(L + 1) + Π_{i ≤ L} a_i · head),
where L = 0 is a plain autoregressive step (no draft at all), target(L + 1) is timed with the logits of
the rows the walk always reads (the root's and the path's but the last), and head is the LM head over one
row alone: a path kept whole needs its last row's logits, for the bonus token, after the pass. While plain steps
win it still drafts one token now and then — after `EXPLORE_EVERY` plain steps,
then twice as many each time drafting still loses, up to `EXPLORE_AT_MOST` —
so that a draft which starts to agree with the target is noticed. Paths are verified by block
verification (rules/block.py; never fewer tokens than token-wise).

In a batched pass (serving/scheduler.py) a sequence's tokens share the pass with the rest of the
batch, and what counts is the batch's rate. The profile also holds what a pass costs: over R rows of one
sequence (R = 1, 2, 4, …, 64: the weights' work) and over S sequences of one row each (S = 1, 2, 4, …,
16: each also reads its own cache), a pass over R rows of S sequences costing rows(R) + sequences(S) −
rows(S). Given the rest of the batch's load — its sequences and rows, the tokens it is expected to emit,
its seconds outside the pass (BatchLoad, measured by the scheduler over the last steps) — the step drafts
the L that maximises
    (tokens of the rest + expected tokens) / (seconds of the rest + own seconds + pass(rows + 1 + L, S + 1)).
Rows cost about the same whoever brings them, so once the batch keeps the machine busy a draft token costs
what a sequence's plain token costs and is worth less: trees shrink, and plain steps win.

Every choice depends only on what earlier steps observed, never on the random
draws of the step it shapes (the rest of the batch's load included: other sequences' past), so each emitted
token still has the target's law; with a given profile a seeded run makes the same choices and the same
text (which is why a scheduler gives seeded generations no load: they choose as they would alone).
"""

from collections import Counter
from dataclasses import asdict, dataclass
import copy
import hashlib
import json
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
    batch_rows: tuple[int, ...] = ()  # a pass over batch_rows[i] new rows took batch_seconds[i] (empty: not measured)
    batch_seconds: tuple[float, ...] = ()
    batch_sequences: tuple[int, ...] = ()  # ... over batch_sequences[i] sequences, a row each: sequence_seconds[i]
    sequence_seconds: tuple[float, ...] = ()
    head_seconds: float = 0.0  # the LM head over one row on its own: a kept path's last row, read after the pass
    # A step's seconds outside the target's pass, the draft's proposal and that last row, by path length L =
    # 0, 1, ...: its tree's positions and mask, selection, commits, the draft told the kept tokens (empty:
    # not measured)
    overhead_seconds: tuple[float, ...] = ()

    @property
    def max_length(self) -> int:
        return min(len(self.target_seconds) - 1, len(self.draft_seconds))

    def step_seconds(self, length: int, context: int | None = None) -> float:
        """A step that drafts `length` tokens (0: a plain step): drafting plus verifying root and path, over
        a context of `context` tokens (None: the short one measured). Between and beyond the two contexts
        measured, on the line through them (attention's cost grows with the context it reads)."""
        overhead = self.overhead_seconds[length] if length < len(self.overhead_seconds) else 0.0  # any context
        short = self.target_seconds[length] + (self.draft_seconds[length - 1] if length else 0.0) + overhead
        if context is None or not self.long_context or len(self.long_target_seconds) <= length:
            return short
        long = self.long_target_seconds[length] + (self.long_draft_seconds[length - 1] if length else 0.0) + overhead
        share = max(0.0, (context - self.context) / (self.long_context - self.context))
        return max(short + share * (long - short), 0.5 * min(short, long))

    def pass_seconds(self, rows: int, sequences: int = 1) -> float:
        """A target pass over `rows` new rows of `sequences` sequences: rows(R) + sequences(S) − rows(S),
        each on the line through the two measured counts around it (beyond the largest, the last two's)."""
        if not self.batch_rows:
            raise InvalidInputError("this cost profile has no batched passes measured")
        seconds = _on_the_line(self.batch_rows, self.batch_seconds, rows)
        if sequences > 1 and self.batch_sequences:
            seconds += (_on_the_line(self.batch_sequences, self.sequence_seconds, sequences)
                        - _on_the_line(self.batch_rows, self.batch_seconds, sequences))
        return seconds


def _on_the_line(counts: tuple[int, ...], seconds: tuple[float, ...], count: int) -> float:
    if count <= counts[0]:
        return seconds[0]
    upper = next((i for i, c in enumerate(counts) if c >= count), len(counts) - 1)
    lower = max(upper - 1, 0)
    if upper == lower:
        return seconds[upper]
    slope = (seconds[upper] - seconds[lower]) / (counts[upper] - counts[lower])
    return seconds[lower] + slope * (count - counts[lower])


BATCH_ROWS = (1, 2, 4, 8, 16, 32, 64)  # the row counts a batched pass is timed over (64: FEW_QUERIES) ...
BATCH_SEQUENCES = (1, 2, 4, 8, 16)  # ... and the counts of sequences (a scheduler's batch: up to its max_batch)


@dataclass(frozen=True)
class BatchLoad:
    """What the rest of a batched pass brings, as the scheduler measured it over the last steps: its rows in
    the pass, the tokens it is expected to emit, and its seconds outside the pass (drafting, selection)."""

    rows: int
    tokens: float
    seconds: float
    sequences: int = 1


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
    counts = tuple(rows for rows in BATCH_ROWS if context + rows <= target.config.context_length)
    few = max(1, repeats // 2)  # the batch's shapes are long passes: fewer repeats keep the profile's time down
    batch = (counts, _measure_rows(target, context, counts, few), BATCH_SEQUENCES,
             _measure_sequences(target, context, BATCH_SEQUENCES, few))
    draft_config = getattr(getattr(drafter, "lm", None), "config", None)  # a draft model's own context, if any
    long = min(long_context or 0, target.config.context_length // 2,
               getattr(draft_config, "context_length", target.config.context_length) // 2)
    head = _measure_head(target, repeats)
    overheads = _measure_overheads(target, drafter, max_length, context, repeats) if drafter is not None else ()
    measured = dict(batch_rows=batch[0], batch_seconds=batch[1], batch_sequences=batch[2], sequence_seconds=batch[3],
                    head_seconds=head, overhead_seconds=overheads)
    if long <= 2 * context:
        return CostProfile(*short, description, context, **measured)
    long_target, long_draft = _measure_at(target, drafter, max_length, long, repeats)
    return CostProfile(*short, description, context, long_target, long_draft, long, **measured)


def _fastest(run, repeats: int, after=None) -> float:
    """The fastest of `repeats` timed calls of run(), after one untimed call that warms its shape up; after():
    untimed clean-up following every call (a cache truncated back)."""
    best = float("inf")
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        run()
        if repeat:
            best = min(best, time.perf_counter() - start)
        if after is not None:
            after()
    return best


def _measure_overheads(target, drafter, max_length: int, context: int, repeats: int) -> tuple[float, ...]:
    """Each path length's step outside the target's pass, the proposal and a kept path's last row, on a real
    generation (decoding.Generation) over `context` tokens: L = 0 a plain step, else a path by block
    verification, as 'auto' runs it. The fastest of `repeats` steps each."""
    from spectr.decoding import Decoder, DecodeSettings

    vocab = target.config.vocab_size
    prompt = [(11 * i + 5) % vocab for i in range(context)]
    params, seconds = SamplingParams(temperature=1.0), []
    for length in range(max_length + 1):
        settings = (DecodeSettings(method="ar") if length == 0
                    else DecodeSettings(method="sd", rule="block", length=length, tree="iid"))
        decoder = Decoder(target, drafter if length else None, settings, params)
        generation = decoder.start(prompt, (repeats + 1) * (length + 1), torch.Generator().manual_seed(length))
        for _ in generation.prefill():
            pass
        best = float("inf")
        for repeat in range(repeats + 1):
            if generation.finished:
                break
            start = time.perf_counter()
            target_pass = generation.prepare()
            passing = time.perf_counter()
            out = target.forward(target_pass.tokens[None], target_pass.positions, generation.cache,
                                 **target_pass.options(decoder._capture_kwargs))
            passed = time.perf_counter()
            step = generation.complete(out, passed - passing)
            # step.verify_seconds: the pass and any row computed after it; step.draft_seconds: the proposal
            outside = time.perf_counter() - start - step.verify_seconds - step.draft_seconds
            if repeat:
                best = min(best, max(outside, 0.0))
        seconds.append(best if best < float("inf") else 0.0)
    return tuple(seconds)


def _measure_head(target, repeats: int) -> float:
    """The target's LM head over one row alone (0 where the forward computes every row's logits itself)."""
    head = getattr(target, "logits", None)
    if head is None:
        return 0.0
    hidden = torch.zeros(1, target.config.hidden_size)
    return _fastest(lambda: head(hidden), repeats)


def _measure_rows(target, context: int, row_counts: tuple[int, ...], repeats: int) -> tuple[float, ...]:
    """The target over each count of new rows (causal, one row's logits) after `context` cached tokens."""
    vocab = target.config.vocab_size
    text = [(5 * i + 1) % vocab for i in range(context + max(row_counts))]
    cache = target.new_cache(len(text))
    no_rows = torch.tensor([], dtype=torch.long)
    target.forward(torch.tensor([text[:context]]), torch.arange(context), cache, logit_indices=no_rows)
    first, seconds = torch.tensor([0]), []
    for rows in row_counts:
        tokens, positions = torch.tensor([text[context : context + rows]]), torch.arange(context, context + rows)
        seconds.append(_fastest(lambda: target.forward(tokens, positions, cache, logit_indices=first), repeats,
                                lambda: cache.truncate(context)))
    return tuple(_rising(seconds))


def _measure_sequences(target, context: int, counts: tuple[int, ...], repeats: int) -> tuple[float, ...]:
    """The target over each count of sequences, one new row each after `context` cached tokens of its own: in
    one batched pass where the target has one (forward_batch), else one after another (as a scheduler runs them)."""
    from spectr.models.llama import BatchItem

    vocab = target.config.vocab_size
    first_cache = target.new_cache(context + 1)
    text = [(3 * j + 1) % vocab for j in range(context)]
    no_rows = torch.tensor([], dtype=torch.long)
    target.forward(torch.tensor([text]), torch.arange(context), first_cache, logit_indices=no_rows)
    caches = [first_cache] + [copy.deepcopy(first_cache) for _ in range(max(counts) - 1)]  # each its own memory
    batched = getattr(target, "forward_batch", None)
    root, position, first = torch.tensor([1]), torch.tensor([context]), torch.tensor([0])
    def one_after_another(items):
        for item in items:
            target.forward(item.tokens[None], item.positions, item.cache, logit_indices=first)

    def truncate(items):
        for item in items:
            item.cache.truncate(context)

    run = batched if batched is not None else one_after_another
    seconds = []
    for count in counts:
        items = [BatchItem(root, position, cache, None, first) for cache in caches[:count]]
        seconds.append(_fastest(lambda: run(items), repeats, lambda: truncate(items)))
    return tuple(_rising(seconds))


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
        mask = tree_attention_mask(parents, context)
        # The rows whose logits a step's pass computes: the root, and the path's rows but the last (the
        # walk reads those whatever it draws: decoding.surely_read_rows).
        rows = torch.arange(max(1, new - 1))
        target_seconds.append(_fastest(lambda: target.forward(tokens, positions, cache, mask, logit_indices=rows),
                                       repeats, lambda: cache.truncate(context)))
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

    def _reaches(self, length: int) -> list[float]:
        """Π_{i ≤ j} a_i for j = 1 .. L: the chance the walk keeps the path to depth j."""
        reaches, reach = [], 1.0
        for depth in range(length):
            reach *= self.acceptance[depth]
            reaches.append(reach)
        return reaches

    def expected_tokens(self, length: int) -> float:
        """1 + Σ_{j ≤ L} Π_{i ≤ j} a_i: the emitted tokens a step of this length is expected to give."""
        return 1.0 + sum(self._reaches(length))

    def kept_whole(self, length: int) -> float:
        """Π_{i ≤ L} a_i (0 for a plain step): the chance a path of this length is kept to its end (then its
        last row's logits are computed after the pass, for the bonus token: profile.head_seconds)."""
        return self._reaches(length)[-1] if length else 0.0

    def best_length(self, context: int | None = None, load: BatchLoad | None = None) -> int:
        profile, lengths, reaches = self.profile, range(self.max_length + 1), [0.0] + self._reaches(self.max_length)
        tokens = [1.0 + sum(reaches[: n + 1]) for n in lengths]
        # a path kept whole (chance reaches[n]) reads its last row after the pass
        seconds = [profile.step_seconds(n, context) + reaches[n] * profile.head_seconds for n in lengths]
        if load is None or not profile.batch_rows:
            rates = [tokens[n] / seconds[n] for n in lengths]
        else:  # the batch's rate: this sequence's own seconds (drafting, its long context) beside the pass
            rates = [(load.tokens + tokens[n]) / (load.seconds + seconds[n] - profile.target_seconds[n]
                                                  + profile.pass_seconds(load.rows + 1 + n, load.sequences + 1))
                     for n in lengths]
        return max(range(len(rates)), key=lambda n: (rates[n], -n))  # ties: the shorter

    def choose(self, context: int | None = None, load: BatchLoad | None = None) -> int:
        """This step's path length, for a step over `context` tokens of text, in a batched pass beside `load`
        (None: a pass of its own)."""
        length = self.best_length(context, load)
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
