"""The decoding loop: autoregressive, speculative (k = 1) and SpecTr decoding share it.

One step of speculative decoding (SPECTR.md §2): draft a tree, verify every
node in one target forward, walk the tree with a token-level rule, commit the
accepted path in both caches. Invariant between steps: the target's cache
holds the text but its last token (the next tree's root); the drafter keeps its
own cache.

Glossary: a step *emits* 1..L+1 tokens — the accepted path, then a residual or
bonus token; *block efficiency* is emitted tokens per target forward.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
import time

import torch

from spectr.drafters import Drafter
from spectr.drafters.base import capture_for, capture_kwargs
from spectr.errors import ContextOverflowError, InvalidInputError, UnsupportedModelError
from spectr.models.base import head_of
from spectr.planner import BatchLoad, CostProfile, PathPlanner
from spectr.processing import SamplingParams, TokenHistory, TokenLogprob, logits_to_probs, node_paths, token_logprob
from spectr.rules import RULES, Rule
from spectr.sampling import sample_categorical
from spectr.tree import DraftTree, tree_attention_mask, tree_positions
from spectr.walk import judges_path, walk

METHODS = ("ar", "sd", "spectr")
# "iid": k drafts of L tokens sampled i.i.d. and merged (SpecTr); "dynamic": the `budget` nodes the draft is
# most confident in, L levels deep, k expansions a level (EAGLE-2; drafters/dynamic.py); "auto": one draft
# path a step, its length (0 = a plain step) up to L chosen from measured cost and acceptance (planner.py);
# "greedy": k − 1 chosen children and one drawn from the rest a level, L levels (drafters/greedy.py).
TREES = ("iid", "dynamic", "auto", "greedy")
_NO_ROWS = torch.tensor([], dtype=torch.long)  # logit_indices: hidden states only

# The (k, L) of a fixed (iid) shape when the caller gives only one of them or names the tree alone (with no
# shape at all, settings.decode_settings picks tree 'auto'): the fastest shape of `spectr bench`'s grid on this machine with
# the shipped draft (docs/CHAT.md: chat prompts, native target, int4 draft). With a draft accepting ~0.3
# a token, one draft token a step wins at both temperatures (T = 1: 150-167 tok/s, BE 1.3; K-SEQ k = 2, L = 1:
# 137, BE 1.39) -- and still loses to plain sampling (186): the draft is what caps speculation today.
DEFAULT_SHAPE = {"greedy": (1, 1), "sampling": (1, 1)}


def default_shape(temperature: float) -> tuple[int, int]:
    """(k, L) for a temperature when the caller gives none."""
    return DEFAULT_SHAPE["greedy" if temperature == 0 else "sampling"]


@dataclass(frozen=True)
class DecodeSettings:
    method: str = "spectr"  # "ar": plain sampling; "sd": one draft (k = 1); "spectr": k drafts
    rule: str | None = None  # default: "standard" for sd, "kseq" for spectr
    k: int = DEFAULT_SHAPE["sampling"][0]
    length: int = DEFAULT_SHAPE["sampling"][1]  # L, draft tokens per draft
    tree: str = "iid"  # how the draft tree is built (TREES)
    budget: int | None = None  # nodes of a dynamic tree (default k·L)

    def __post_init__(self):
        if self.method not in METHODS:
            raise InvalidInputError(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        sizes = [("k", self.k), ("L", self.length)] + ([("budget", self.budget)] if self.budget is not None else [])
        for name, value in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be an int >= 1, got {value!r}")
        if self.tree not in TREES:
            raise InvalidInputError(f"tree must be one of {', '.join(TREES)}, got '{self.tree}'")
        if self.tree == "dynamic" and self.rule is not None:
            raise InvalidInputError(
                f"rule '{self.rule}' does not apply to a dynamic tree: its nodes are chosen, not sampled, and it is "
                "verified by sampling the target and following the tree (leave the rule unset)")
        if self.tree == "auto" and self.method == "ar":
            raise InvalidInputError("tree 'auto' chooses how much to draft: it needs method 'sd' or 'spectr'")
        if self.budget is not None and self.tree != "dynamic":
            raise InvalidInputError("budget sets the nodes of a dynamic tree; it needs tree 'dynamic'")
        if self.rule is not None and self.rule not in RULES:
            raise InvalidInputError(f"rule must be one of {', '.join(RULES)}, got '{self.rule}'")
        rule = RULES[self.rule_name]
        if rule.max_candidates is not None and self.rule_candidates > rule.max_candidates:
            raise InvalidInputError(f"rule '{self.rule_name}' takes one draft; got k = {self.k} (use 'kseq')")
        if rule.path_level and not (self.tree == "auto" or (self.tree == "iid" and self.num_drafts == 1)):
            raise InvalidInputError(f"rule '{self.rule_name}' judges one draft path: it needs tree 'auto', or "
                                    f"tree 'iid' with one draft (got tree '{self.tree}', k = {self.k})")

    @property
    def rule_name(self) -> str:
        if self.rule:
            return self.rule
        if self.tree == "auto":
            return "block"
        return "standard" if self.method == "sd" or self.tree == "greedy" else "kseq"

    @property
    def num_drafts(self) -> int:
        return 1 if self.method == "sd" or self.tree == "auto" else self.k

    @property
    def rule_candidates(self) -> int:
        """Most candidates the rule judges at one node: every draft for i.i.d. drafts; one drawn child a level
        for greedy trees; one draft for auto."""
        return self.num_drafts if self.tree == "iid" else 1

    @property
    def node_budget(self) -> int | None:
        """The nodes of a dynamic tree; None for i.i.d. drafts."""
        if self.tree != "dynamic":
            return None
        return self.budget if self.budget is not None else self.num_drafts * self.length

    @property
    def draft_nodes(self) -> int:
        """Most nodes one proposal runs through the draft (a dynamic tree runs k a level, kept or not)."""
        if self.method == "ar":
            return 0
        return max(self.tree_size, self.num_drafts * (self.length - 1))

    @property
    def tree_size(self) -> int:
        """Most tree nodes one verification can add to the target's cache (besides the root)."""
        if self.method == "ar":
            return 0
        return self.node_budget or self.num_drafts * self.length


@dataclass
class StepStats:
    emitted: list[int]
    accepted: int  # tree tokens kept (the emitted tokens but the last)
    candidates_per_level: list[int] = field(default_factory=list)
    tree_nodes: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    select_seconds: float = 0.0
    shape: str = "plain"  # what was drafted: "plain" (nothing), "L=3", "k=2 L=3", "dynamic k=2 L=3 n=6"
    logprobs: list[TokenLogprob] | None = None  # per emitted token, when the decoder was asked for them

    def truncate(self, count: int) -> None:
        """Keep the first `count` emitted tokens (a generation ended inside this step): the accepted
        tokens, the levels counted and the logprobs are those among them."""
        self.emitted = self.emitted[:count]
        self.accepted = min(self.accepted, count)
        self.candidates_per_level = self.candidates_per_level[:count]
        if self.logprobs is not None:
            self.logprobs = self.logprobs[:count]


class RowProbs:
    """The target's processed law p at the rows of a verified tree, each computed when the walk first reads
    it: the LM head runs on the root and the accepted path only, not on every node (with a vocabulary of
    49k the head is the largest matmul of a step). A row's logits are the same bits either way.
    `seconds` is the time spent computing rows."""

    def __init__(self, head, hidden: torch.Tensor, params: SamplingParams, tree: DraftTree,
                 first_logits: torch.Tensor | None = None):
        """first_logits [m, V]: rows 0 .. m − 1 (the root, and on a judged path the rows before its last
        token), where the target's pass computed them."""
        self.head, self.hidden, self.params = head, hidden, params  # hidden [n + 1, D]
        self.tree = tree  # its paths, for penalties (a node's law counts the tokens on its path)
        self.rows: dict[int, torch.Tensor] = {}
        self.seconds = 0.0
        self._first_logits = first_logits
        self._first = 0 if first_logits is None else first_logits.shape[0]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """p at rows [row : row + 1] -> [1, V] (the walk reads one row at a time)."""
        row = rows.start
        if rows.stop != row + 1:
            raise InvalidInputError("RowProbs reads one row at a time, as target_probs[row : row + 1]")
        if row not in self.rows:
            start = time.perf_counter()
            paths = tree_paths(self.tree, [row]) if self.params.reads_history else None
            logits = (self._first_logits[row : row + 1] if row < self._first
                      else self.head(self.hidden[row : row + 1]))
            self.rows[row] = logits_to_probs(logits, self.params, paths)
            self.seconds += time.perf_counter() - start
        return self.rows[row]


def require_room(context: int, prompt_tokens: int, max_new_tokens: int, settings: DecodeSettings) -> int:
    """Positions a generation needs (prompt, new tokens, one draft tree); raise if over the context."""
    needed = prompt_tokens + max_new_tokens + settings.tree_size + 1
    if needed > context:
        raise ContextOverflowError(
            f"the prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) + draft tree "
            f"({settings.tree_size}) need {needed} positions; the model's context is {context}"
        )
    return needed


def tree_paths(tree: DraftTree, rows: list[int]) -> list[list[int]]:
    """What the contexts of tree rows (0: the root, 1 + i: node i) add to the text: the tokens of the path."""
    return node_paths(tree.tokens.tolist(), tree.parents.tolist(), [row - 1 for row in rows])


class Decoder:
    """Samples continuations of a prompt from `target`, exactly, with help from `drafter`."""

    def __init__(self, target, drafter: Drafter | None, settings: DecodeSettings, params: SamplingParams,
                 profile: CostProfile | None = None, logprobs: int | None = None):
        """profile: the measured costs that tree 'auto' chooses by (planner.py; api.Engine.cost_profile).
        logprobs: report each emitted token's log-probability under the target's processed law, with that
        many of the likeliest tokens (0: the token's alone); None: none."""
        if settings.method != "ar" and drafter is None:
            raise InvalidInputError(f"method '{settings.method}' needs a drafter")
        self.planner = None
        if settings.tree == "auto":
            if profile is None:
                raise InvalidInputError("tree 'auto' needs the machine's cost profile (Engine.cost_profile())")
            self.planner = PathPlanner(profile, settings.length)
        self.target = target
        self.drafter = drafter
        self.settings = settings
        self.params = params
        self._law = params  # params with this generation's TokenHistory when a penalty reads the text
        self.logprobs = logprobs
        self.rule: Rule = RULES[settings.rule_name]
        # A drafter that reads the target's features (an EAGLE-style head) gets them for every
        # token the target has run: the prompt's, then the root's and the accepted path's after each step.
        self._feed = getattr(drafter, "uses_target_features", False)
        self._capture = capture_for(drafter)  # the target layers a fused-feature head reads, if any
        self._capture_kwargs = capture_kwargs(drafter)  # once: the loop passes them to every target pass
        if self._capture and not getattr(target, "captures_layers", False):
            raise UnsupportedModelError(
                f"the draft reads the target's layers {self._capture}: that needs spectr's own forward for the "
                f"target, not {getattr(target, 'backend', type(target).__name__)}")
        self._head = head_of(target)
        self.prefill_seconds = 0.0  # the last stream's prompt pass

    def _features(self, out) -> torch.Tensor:
        return out.layers[0] if self._capture else out.hidden[0]

    def start(self, prompt: list[int], max_new_tokens: int, generator: torch.Generator,
              stop_token_ids: frozenset[int] = frozenset()) -> "Generation":
        """A generation of this decoder's: its caches made, its prompt not yet run (Generation.prefill).
        One generation of a decoder at a time (it owns the drafter)."""
        return Generation(self, prompt, max_new_tokens, generator, stop_token_ids)

    def stream(
        self,
        prompt: list[int],
        max_new_tokens: int,
        generator: torch.Generator,
        stop_token_ids: frozenset[int] = frozenset(),
    ) -> Iterator[StepStats]:
        """Yield each step's stats (its emitted tokens included) until max_new_tokens or a stop token."""
        generation = self.start(prompt, max_new_tokens, generator, stop_token_ids)
        for _ in generation.prefill():
            pass
        while not generation.finished:
            target_pass = generation.prepare()
            started = time.perf_counter()
            out = self.target.forward(target_pass.tokens[None], target_pass.positions, generation.cache,
                                      **target_pass.options(self._capture_kwargs))
            yield generation.complete(out, time.perf_counter() - started)

    def _propose(self, text: list[int], generator: torch.Generator, load: BatchLoad | None = None):
        """This step's draft tree and its shape's name (load: the rest of a batched pass, for 'auto')."""
        settings = self.settings
        if self.planner is not None:
            length = self.planner.choose(len(text), load)
            if length == 0:  # a plain step: the target alone (the drafter is not asked, nor told)
                return _PLAIN, "plain"
            return self.drafter.propose(text, 1, length, self._law, generator), f"L={length}"
        k, length = settings.num_drafts, settings.length
        if settings.tree == "iid":  # the plain call: every drafter takes it
            return self.drafter.propose(text, k, length, self._law, generator), (
                f"L={length}" if k == 1 else f"k={k} L={length}")
        tree = self.drafter.propose(text, k, length, self._law, generator, tree=settings.tree,
                                    budget=settings.node_budget)
        nodes = f" n={settings.node_budget}" if settings.node_budget else ""
        return tree, f"{settings.tree} k={k} L={length}{nodes}"


@dataclass
class TargetPass:
    """What a step asks of the target: tokens [T] at positions [T] over the generation's cache, the mask
    [T, cache.length + T] (None: causal) and the rows that need logits (None: all)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    attention_mask: torch.Tensor | None
    logit_indices: torch.Tensor | None

    def options(self, capture_kwargs: dict) -> dict:
        """forward()'s keyword arguments for this pass (those left at their defaults left out: every target
        forward takes that)."""
        options = dict(capture_kwargs)
        if self.attention_mask is not None:
            options["attention_mask"] = self.attention_mask
        if self.logit_indices is not None:
            options["logit_indices"] = self.logit_indices
        return options


_ROOT = torch.tensor([0])  # the root's row: the walk always reads it, so its logits come with the pass


def surely_read_rows(tree: DraftTree, rule: Rule) -> int:
    """How many leading rows of a verified tree the walk reads whatever it draws: the root's, and on a path
    judged whole (block verification) the rows before each path token -- they come with the target's pass,
    where the LM head reads its weight once for all of them (alone, each row would read it again). The
    rest (accepted nodes, a kept path's last row) are computed as the walk reaches them."""
    return tree.paths.shape[1] if judges_path(tree, rule) else 1


class Generation:
    """One generation's state between steps, a step in two halves around the target's pass: `prepare`
    drafts and says what the target must run (TargetPass), `complete` takes the pass's output, walks the
    tree, commits and returns the step's stats. Decoder.stream runs the pass itself; a scheduler may run
    many generations' passes in one batched forward (the outputs are the same bits, so is the law)."""

    def __init__(self, decoder: Decoder, prompt: list[int], max_new_tokens: int, generator: torch.Generator,
                 stop_token_ids: frozenset[int]):
        if not prompt:
            raise InvalidInputError("the prompt is empty: give at least one token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        self.decoder, self.generator, self.stop_token_ids = decoder, generator, stop_token_ids
        self.max_new_tokens = max_new_tokens
        settings, drafter = decoder.settings, decoder.drafter
        needed = require_room(decoder.target.config.context_length, len(prompt), max_new_tokens, settings)
        self.cache = decoder.target.new_cache(needed)
        if drafter is not None:
            drafter.reset(needed + settings.draft_nodes - settings.tree_size)
            if getattr(drafter, "shares_target_cache", False):  # a self-draft drafts in the target's cache
                drafter.attach_cache(self.cache)
        self.text = list(prompt)
        self.history = TokenHistory(decoder.target.config.vocab_size, self.text) if decoder.params.reads_history else None
        decoder._law = decoder.params if self.history is None else replace(decoder.params, history=self.history)
        self.produced = 0
        self.finished = False
        self.prefilled = False
        self._pending = None  # (tree, shape, draft seconds) between prepare and complete

    def prefill(self) -> Iterator[int]:
        """Run the prompt (all but its last token, the first root) through the target, a chunk of up to
        PREFILL_CHUNK tokens a step of this iterator (a scheduler runs others' steps between them), then the
        draft's own pass; yields the tokens done so far. decoder.prefill_seconds: their time."""
        decoder, text = self.decoder, self.text
        decoder.prefill_seconds = 0.0
        from spectr.models.llama import PREFILL_CHUNK

        if len(text) == 1:
            self.prefilled = True
        for begin in range(0, len(text) - 1, PREFILL_CHUNK):
            started = time.perf_counter()
            end = min(begin + PREFILL_CHUNK, len(text) - 1)
            out = decoder.target.forward(torch.tensor(text[begin:end])[None], torch.arange(begin, end), self.cache,
                                         logit_indices=_NO_ROWS, **decoder._capture_kwargs)
            if decoder._feed:
                decoder.drafter.observe(decoder._features(out))
            if end == len(text) - 1 and hasattr(decoder.drafter, "prefill"):  # the draft's own pass belongs here too
                decoder.drafter.prefill(text)
            decoder.prefill_seconds += time.perf_counter() - started
            self.prefilled = end == len(text) - 1
            yield end

    def prepare(self, load: BatchLoad | None = None) -> TargetPass:
        """Draft this step's tree; what the target must run over it. load: what the rest of a batched pass
        brings, for tree 'auto' to choose by the batch's rate (planner.py; None: as if alone)."""
        decoder, text = self.decoder, self.text
        if not self.prefilled:
            for _ in self.prefill():
                pass
        cached = len(text) - 1
        if decoder.settings.method == "ar":
            self._pending = (None, "plain", 0.0)
            return TargetPass(torch.tensor([text[-1]]), torch.tensor([cached]), None, None)
        started = time.perf_counter()
        tree, shape = decoder._propose(text, self.generator, load)
        self._pending = (tree, shape, time.perf_counter() - started)
        if tree is _PLAIN:  # the root alone: causal (no mask to build over the context)
            return TargetPass(torch.tensor([text[-1]]), torch.tensor([cached]), None,
                              None if decoder._head is None else _ROOT)
        tokens = torch.cat([torch.tensor([text[-1]]), tree.tokens])
        positions, mask = tree_positions(tree.parents, cached), tree_attention_mask(tree.parents, cached)
        first = surely_read_rows(tree, decoder.rule)
        return TargetPass(tokens, positions, mask,
                          None if decoder._head is None else _ROOT if first == 1 else torch.arange(first))

    def complete(self, out, verify_seconds: float) -> StepStats:
        """The step's end from the target's output over the TargetPass: selection, commits, stats (its emitted
        tokens cut at a stop token or max_new_tokens, after which `finished`)."""
        decoder, text, cache, generator = self.decoder, self.text, self.cache, self.generator
        tree, shape, draft_seconds = self._pending
        self._pending = None
        cached = len(text) - 1
        law = decoder._law
        if tree is None or tree is _PLAIN:  # a plain step: the root's row, sampled (as the walk would)
            selecting = time.perf_counter()
            probs = logits_to_probs(out.logits[0, :1], law)
            token = int(sample_categorical(probs, generator)[0, 0])
            if tree is _PLAIN and decoder._feed:  # the drafter is not told the token, but gets the root's features
                decoder.drafter.observe(decoder._features(out)[[0]])
            stats = StepStats(
                emitted=[token], accepted=0, verify_seconds=verify_seconds,
                select_seconds=time.perf_counter() - selecting,
                logprobs=None if decoder.logprobs is None else [token_logprob(probs[0], token, decoder.logprobs)])
            return self._account(stats)
        selecting = time.perf_counter()
        lazy = None  # the head's rows computed during the walk (verification work, timed as such)
        if decoder._head is None:
            paths = tree_paths(tree, list(range(tree.num_nodes + 1))) if law.reads_history else None
            target_probs = logits_to_probs(out.logits[0], law, paths)  # [n + 1, V]
        else:
            target_probs = lazy = RowProbs(decoder._head, out.hidden[0], law, tree, first_logits=out.logits[0])
        emitted, path, levels = walk(tree, target_probs, decoder.rule, generator)
        logprobs = None
        if decoder.logprobs is not None:  # each emitted token's law: the root's row, then its accepted parent's
            logprobs = [token_logprob(target_probs[row : row + 1][0], token, decoder.logprobs)
                        for row, token in zip([0] + [1 + node for node in path], emitted)]
        head_seconds = 0.0 if lazy is None else lazy.seconds
        cache.commit(cached + 1, [cached + 1 + node for node in path])
        decoder.drafter.commit(path)
        if decoder._feed:
            decoder.drafter.observe(decoder._features(out)[[0] + [1 + node for node in path]])
        if decoder.planner is not None and tree.num_nodes:
            decoder.planner.observe(_path_acceptance(tree, target_probs))
        stats = StepStats(
            emitted=emitted, accepted=len(path), candidates_per_level=levels, tree_nodes=tree.num_nodes,
            draft_seconds=draft_seconds, verify_seconds=verify_seconds + head_seconds,
            select_seconds=time.perf_counter() - selecting - head_seconds, shape=shape, logprobs=logprobs,
        )
        return self._account(stats)

    def _account(self, stats: StepStats) -> StepStats:
        ends = [position + 1 for position, token in enumerate(stats.emitted) if token in self.stop_token_ids]
        stats.truncate(min(ends + [self.max_new_tokens - self.produced]))
        self.text.extend(stats.emitted)
        if self.history is not None:
            self.history.extend(stats.emitted)
        self.produced += len(stats.emitted)
        self.finished = self.produced >= self.max_new_tokens or stats.emitted[-1] in self.stop_token_ids
        return stats


_PLAIN = DraftTree(tokens=torch.empty(0, dtype=torch.long), parents=torch.empty(0, dtype=torch.long),
                   paths=torch.empty(1, 0, dtype=torch.long), draft_probs=None)


def _path_acceptance(tree: DraftTree, target_probs) -> list[float]:
    """The chance each depth of a single-path tree is kept, where the walk read p (rows 0, 1, ... in order):
    Σ min(p, q) for a sampled token, p(token) for a deterministic one (n-gram lookups)."""
    chances = []
    for row in range(tree.num_nodes):
        if isinstance(target_probs, RowProbs) and row not in target_probs.rows:
            break
        p = target_probs[row : row + 1][0]
        chances.append(float(p[tree.tokens[row]]) if tree.draft_probs is None
                       else float(torch.minimum(p, tree.draft_probs[row]).sum()))
    return chances
