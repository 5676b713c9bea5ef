"""Self-speculation: the target drafts for itself with a cheaper forward, in its own KV cache.

The draft is the target with some of its layers skipped (the residual stream passes them unchanged,
as in Draft & Verify and LayerSkip), or with SparQ attention over the older context (its top query
components pick the few slots attended exactly; models/attention.py's SparQ: at long contexts reading
the cache, not the weights, is what a step costs), or both, as TriForce pairs a sparse cache with a
smaller model: the same weights, no training, any model spectr's own forward runs. It drafts in the
target's cache, past the text (slots len(text) − 1 on, the root first), and hands those slots back
before verification, which overwrites them: a skipped layer's slots are never read by the draft (it does
not run), and the layers it runs read the target's exact entries for the text. So there is no second
cache and no prefill of the prompt through a draft. Like any draft it changes only the speed: every
rule keeps the target's law whatever q is.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from spectr.drafters.model import ModelDrafter
from spectr.errors import InvalidInputError
from spectr.models.attention import SparQ
from spectr.processing import SamplingParams
from spectr.tree import DraftTree

# The spec of a layer-skipping self-draft: "self-skip" (DEFAULT_SKIP_FRACTION of the layers, from the
# middle) or "self-skip:a-b" (layers a..b skipped, 0-based, inclusive) or "self-skip:3,5,7".
SELF_SKIP = "self-skip"
# The share of the layers the default self-draft skips: those nearest the middle (the first and last layers
# map tokens in and out of the residual stream; the middle ones change it least). Measured on the default
# target (chat prompts, T = 1, one draft token): a third (layers 10-19) gives block efficiency 1.56, half
# (7-21) 1.24, 22 of 30 1.07.
DEFAULT_SKIP_FRACTION = 1 / 3


def parse_skip(spec: str, num_layers: int) -> tuple[int, ...]:
    """The layers a "self-skip[:layers]" spec skips, checked against a model of num_layers layers."""
    if spec == SELF_SKIP:
        count = round(num_layers * DEFAULT_SKIP_FRACTION)
        first = (num_layers - count) // 2
        return tuple(range(first, first + count))
    prefix = SELF_SKIP + ":"
    if not spec.startswith(prefix):
        raise InvalidInputError(f"a self-draft is '{SELF_SKIP}' or '{SELF_SKIP}:<layers>', got '{spec}'")
    layers: set[int] = set()
    try:
        for part in spec[len(prefix):].split(","):
            low, _, high = part.partition("-")
            layers.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise InvalidInputError(f"'{spec}': layers are numbers or ranges a-b, comma-separated (e.g. "
                                f"'{SELF_SKIP}:8-21' or '{SELF_SKIP}:3,5,7')") from None
    if not layers or min(layers) < 0 or max(layers) >= num_layers:
        raise InvalidInputError(f"'{spec}': the model has layers 0..{num_layers - 1}")
    if len(layers) == num_layers:
        raise InvalidInputError(f"'{spec}' skips every layer: nothing would be left to draft with")
    return tuple(sorted(layers))


# SparQ self-drafts: "sparq" (SparQ's defaults) or "sparq:<rank>,<keep>", alone or joined to a layer-skip
# spec by "+" ("sparq+self-skip:10-19").
SPARQ = "sparq"


def parse_sparq(spec: str) -> SparQ:
    """The SparQ a "sparq[:rank,keep]" spec names."""
    if spec == SPARQ:
        return SparQ()
    prefix = SPARQ + ":"
    try:
        if not spec.startswith(prefix):
            raise ValueError
        rank, keep = (int(part) for part in spec[len(prefix):].split(","))
    except ValueError:
        raise InvalidInputError(f"SparQ is named '{SPARQ}' or '{SPARQ}:<rank>,<keep>' (e.g. "
                                f"'{SPARQ}:16,128': 16 query components, 128 older slots kept), got '{spec}'") from None
    return SparQ(rank=rank, keep=keep)


@dataclass(frozen=True)
class SelfDraft:
    """What a self-draft leaves out of the target: layers (skip) and full attention (sparse)."""

    skip: tuple[int, ...] = ()
    sparse: SparQ | None = None

    def summary(self, num_layers: int) -> str:
        """What is left out, in words (a drafter's name)."""
        parts = [f"layers {_ranges(self.skip)} of {num_layers} skipped"] if self.skip else []
        if self.sparse is not None:
            parts.append(f"SparQ attention (rank {self.sparse.rank}, {self.sparse.keep} older slots kept, "
                         f"the last {self.sparse.window} exact)")
        return ", ".join(parts)

    def describe(self, num_layers: int) -> str:
        return "the target itself, " + self.summary(num_layers)


def parse_self_draft(spec: str, num_layers: int) -> SelfDraft:
    """The self-draft a spec names: "self-skip[:layers]", "sparq[:rank,keep]", or both joined by "+"."""
    skip, sparse = (), None
    for part in spec.split("+"):
        if part == SPARQ or part.startswith(SPARQ + ":"):
            if sparse is not None:
                raise InvalidInputError(f"'{spec}' names SparQ twice")
            sparse = parse_sparq(part)
        else:
            if skip:
                raise InvalidInputError(f"'{spec}' names skipped layers twice")
            skip = parse_skip(part, num_layers)
    return SelfDraft(skip=skip, sparse=sparse)


def is_self_draft(spec) -> bool:
    first = spec.split("+")[0] if isinstance(spec, str) else None
    return first in (SELF_SKIP, SPARQ) or isinstance(first, str) and first.startswith((SELF_SKIP + ":", SPARQ + ":"))


def _ranges(layers: tuple[int, ...]) -> str:
    """3, 4, 5, 9 -> '3-5, 9'."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


class _Cheaper:
    """The target's forward with `skip` left out and `sparse` attention: what ModelDrafter drives."""

    def __init__(self, lm, skip: Iterable[int], sparse: SparQ | None):
        self.lm, self.skip, self.sparse, self.config = lm, frozenset(skip), sparse, lm.config

    def new_cache(self, *args, **kwargs):
        return self.lm.new_cache(*args, **kwargs)

    def forward(self, tokens, positions, cache, attention_mask=None, logit_indices=None):
        return self.lm.forward(tokens, positions, cache, attention_mask, logit_indices=logit_indices, skip=self.skip,
                               sparse=self.sparse)


class SelfDrafter(ModelDrafter):
    """The target with layers skipped and/or SparQ attention, drafting in the target's own cache (see the
    module)."""

    shares_target_cache = True  # the decoder hands it the target's cache: attach_cache

    def __init__(self, lm, skip: Iterable[int] = (), sparse: SparQ | None = None):
        if not getattr(lm, "supports_skip", False) or (sparse is not None and not getattr(lm, "supports_sparse", False)):
            raise InvalidInputError(f"a self-draft needs spectr's own forward for the target, not "
                                    f"{getattr(lm, 'backend', type(lm).__name__)}")
        super().__init__(_Cheaper(lm, skip, sparse))
        self.skip = tuple(sorted(set(skip)))
        self.sparse = sparse
        self.name = SelfDraft(self.skip, sparse).summary(lm.config.num_layers)

    @property
    def target(self):
        """The target's own forward (what this draft leaves parts of out)."""
        return self.lm.lm

    def reset(self, capacity: int) -> None:
        self.cache = None  # until the decoder attaches the target's

    def attach_cache(self, cache) -> None:
        self.cache = cache

    def prefill(self, text: list[int]) -> None:
        """Nothing to take in: the target's cache, which this draft reads, holds the prompt already."""

    def propose(
        self, text: list[int], k: int, length: int, params: SamplingParams, generator: torch.Generator,
        tree: str = "iid", budget: int | None = None,
    ) -> DraftTree:
        if self.cache is None:
            raise InvalidInputError("a self-draft drafts in the target's cache: the decoder attaches it first")
        if self.cache.length != len(text) - 1:
            raise InvalidInputError(f"the target's cache holds {self.cache.length} tokens; a self-draft after "
                                    f"{len(text)} tokens of text expects all but the last")
        self.cached = self.cache.length  # the root runs first, at the first free slot
        drafted = super().propose(text, k, length, params, generator, tree, budget)
        self.cache.truncate(len(text) - 1)  # the draft's entries: verification overwrites them
        return drafted

    def commit(self, path: list[int]) -> None:
        """Nothing to keep: the target's cache commits the accepted path itself."""
