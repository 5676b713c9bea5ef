"""Self-speculation: the target drafts for itself with a cheaper forward, in its own KV cache.

The draft is the target with some of its layers skipped (the residual stream passes them unchanged,
as in Draft & Verify and LayerSkip): the same weights, no training, any model spectr's own forward
runs. It drafts in the target's cache, past the text (slots len(text) − 1 on, the root first), and
hands those slots back before verification, which overwrites them: a skipped layer's slots are never
read by the draft (it does not run), and the layers it runs read the target's exact entries for the
text. So there is no second cache and no prefill of the prompt through a draft. Like any draft it
changes only the speed: every rule keeps the target's law whatever q is.
"""

from collections.abc import Iterable

import torch

from spectr.drafters.model import ModelDrafter
from spectr.errors import InvalidInputError
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


def is_self_draft(spec) -> bool:
    return isinstance(spec, str) and (spec == SELF_SKIP or spec.startswith(SELF_SKIP + ":"))


class _Skipping:
    """The target's forward with `skip` left out: what ModelDrafter drives."""

    def __init__(self, lm, skip: Iterable[int]):
        self.lm, self.skip, self.config = lm, frozenset(skip), lm.config

    def new_cache(self, *args, **kwargs):
        return self.lm.new_cache(*args, **kwargs)

    def forward(self, tokens, positions, cache, attention_mask=None, logit_indices=None):
        return self.lm.forward(tokens, positions, cache, attention_mask, logit_indices=logit_indices, skip=self.skip)


class SelfDrafter(ModelDrafter):
    """The target with layers skipped, drafting in the target's own cache (see the module)."""

    shares_target_cache = True  # the decoder hands it the target's cache: attach_cache

    def __init__(self, lm, skip: Iterable[int]):
        if not getattr(lm, "supports_skip", False):
            raise InvalidInputError(f"a self-draft needs spectr's own forward for the target, not "
                                    f"{getattr(lm, 'backend', type(lm).__name__)}")
        super().__init__(_Skipping(lm, skip))
        self.skip = tuple(sorted(set(skip)))
        self.name = f"self-skip {len(self.skip)} of {lm.config.num_layers} layers"

    def reset(self, capacity: int) -> None:
        self.cache = None  # until the decoder attaches the target's

    def attach_cache(self, cache) -> None:
        self.cache = cache

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
