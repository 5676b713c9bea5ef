"""The drafter interface the decoding loop talks to."""

from typing import Protocol

import torch

from spectr.processing import SamplingParams
from spectr.tree import DraftTree


class Drafter(Protocol):
    """A drafter may also set `uses_target_features = True` and define `observe(features)`: the decoder
    then hands it the target's features of every token the target has run — final-norm hidden states,
    or, where the drafter names `feature_layers`, those layers' outputs (`target_features`). And it may
    define `prefill(text)`: take in the prompt but its last token (the first root) while the decoder
    processes the prompt, so that the first proposal does not carry the prompt's cost into decoding."""

    name: str

    def reset(self, capacity: int) -> None:
        """Forget any previous text; room for `capacity` tokens of text plus drafts."""

    def propose(
        self, text: list[int], k: int, length: int, params: SamplingParams, generator: torch.Generator,
        tree: str = "iid", budget: int | None = None,
    ) -> DraftTree:
        """k draft continuations of `length` tokens after `text` (which ends with the tree's root), or another
        kind of tree (decoding.TREES, built by drafters/shapes.py): 'dynamic', `length` levels deep, k
        expansions and children a level, the `budget` nodes the draft is surest of; 'greedy', k − 1 chosen
        children and one drawn a level, along the likeliest path."""

    def commit(self, path: list[int]) -> None:
        """The walk accepted these nodes of the last tree: keep only them (and the text before)."""


def capture_for(drafter) -> tuple[int, ...]:
    """The target layers a drafter reads (pass as forward(capture=...)); () for none or the final state."""
    if not getattr(drafter, "uses_target_features", False):
        return ()
    return tuple(getattr(drafter, "feature_layers", ()))


def capture_kwargs(drafter) -> dict:
    """forward(...) keyword arguments that give `drafter` the layers it reads ({} for none: every forward
    takes that, only spectr's own takes `capture`)."""
    capture = capture_for(drafter)
    return {"capture": capture} if capture else {}


def target_features(drafter, out) -> torch.Tensor:
    """What `drafter.observe` takes from a target ForwardOutput of one sequence, for every new token."""
    return out.layers[0] if capture_for(drafter) else out.hidden[0]


def root_distributions(drafter, text: list[int], first: int, target_hidden: torch.Tensor, params: SamplingParams):
    """Yield (position, q) for every position in first..len(text)-2: the drafter's distribution of
    the token after `text[:position + 1]`, fed exactly as the decoder feeds it when every draft is
    rejected (a measurement helper; target_hidden: `target_features(drafter, out)` of one target pass
    over text, capture=capture_for(drafter)).
    q is None for a drafter without a distribution (n-gram lookups)."""
    feeds = getattr(drafter, "uses_target_features", False)
    drafter.reset(len(text) + 8)
    if feeds:
        drafter.observe(target_hidden[:first])
    shared = getattr(drafter, "shares_target_cache", False)  # a self-draft drafts in the target's cache
    if shared:
        cache, none = drafter.target.new_cache(len(text) + 8), torch.tensor([], dtype=torch.long)
        drafter.target.forward(torch.tensor([text[:first]]), torch.arange(first), cache, logit_indices=none)
        drafter.attach_cache(cache)
    for position in range(first, len(text) - 1):
        tree = drafter.propose(text[: position + 1], 1, 1, params, torch.Generator().manual_seed(position))
        yield position, None if tree.draft_probs is None else tree.draft_probs[0]
        drafter.commit([])
        if feeds:
            drafter.observe(target_hidden[position : position + 1])
        if shared:  # the text's token goes into the target's cache, as the decoder's verification puts it
            drafter.target.forward(torch.tensor([[text[position]]]), torch.tensor([position]), cache, logit_indices=none)
