"""The one validated model of what a generation runs with; the API, the CLI and the server all build it here.

A caller names what it wants (None: the default) and `GenerationSettings.build` checks everything once and
fills the defaults, which live in this module (and, for the fixed tree shape, in decoding.DEFAULT_SHAPE next
to the settings it shapes). `api.stream` runs a GenerationSettings; nothing downstream re-validates it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spectr.errors import InvalidInputError

if TYPE_CHECKING:  # the CLI reads the defaults below at start-up: torch is imported only when settings are built
    from spectr.decoding import DecodeSettings
    from spectr.processing import SamplingParams

DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_NEW_TOKENS = 128
MAX_LOGPROBS = 20  # top tokens reported per emitted token (OpenAI's bound for top_logprobs)


def decode_settings(method: str = "spectr", rule: str | None = None, k: int | None = None, L: int | None = None,
                    tree: str | None = None, budget: int | None = None,
                    temperature: float = DEFAULT_TEMPERATURE) -> DecodeSettings:
    """How to decode, from what a caller gave (None: the default).

    No shape at all: tree 'auto' up to MAX_AUTO_LENGTH. A k or L without a tree: that fixed shape ('iid'),
    the missing one from the bench's best shape for the temperature.
    """
    from spectr.decoding import DecodeSettings, default_shape
    from spectr.planner import MAX_AUTO_LENGTH

    if tree is None:
        if budget is not None:
            tree = "dynamic"
        elif k is None and L is None and method != "ar" and rule in (None, "standard", "block"):
            tree = "auto"
        else:
            tree = "iid"
    if tree == "auto":
        if k not in (None, 1):
            raise InvalidInputError(f"tree 'auto' drafts one path a step; k = {k} needs tree 'iid' or 'dynamic'")
        return DecodeSettings(method=method, rule=rule, k=1, length=MAX_AUTO_LENGTH if L is None else L, tree="auto")
    default_k, default_length = default_shape(temperature)  # the bench's best shape for this temperature
    return DecodeSettings(method=method, rule=rule, k=default_k if k is None else k,
                          length=default_length if L is None else L, tree=tree, budget=budget)


@dataclass(frozen=True)
class GenerationSettings:
    decode: DecodeSettings
    sampling: SamplingParams
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()  # stop strings (empty ones dropped)
    seed: int | None = None  # None: a fresh random seed
    logprobs: int | None = None  # report logprobs with this many top tokens (0: the token's own); None: none

    @classmethod
    def build(cls, *, method: str = "spectr", rule: str | None = None, k: int | None = None, L: int | None = None,
              tree: str | None = None, budget: int | None = None, temperature: float = DEFAULT_TEMPERATURE,
              top_k: int = 0, top_p: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
              repetition_penalty: float = 1.0, logit_bias: Mapping[int, float] | None = None,
              seed: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
              stop: Sequence[str] | None = None, logprobs: int | None = None) -> GenerationSettings:
        """Every option checked, with a message that names it (InvalidInputError)."""
        from spectr.processing import SamplingParams

        sampling = SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
            logit_bias=tuple(sorted((logit_bias or {}).items())))
        decode = decode_settings(method, rule, k, L, tree, budget, temperature)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) for s in stop or ()):
            raise InvalidInputError(f"stop must be strings, got {stop!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidInputError(f"seed must be an int, got {seed!r}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise InvalidInputError(f"logprobs must be an int in [0, {MAX_LOGPROBS}] (top tokens), got {logprobs!r}")
        return cls(decode=decode, sampling=sampling, max_new_tokens=max_new_tokens,
                   stop=tuple(s for s in stop or () if s), seed=seed, logprobs=logprobs)

    def label(self) -> str:
        """The decoding shape in a few words (the CLI's stats line)."""
        decode = self.decode
        if decode.method == "ar":
            return "ar"
        if decode.tree == "auto":
            return f"{decode.method}, auto up to L={decode.length}, rule {decode.rule_name}"
        if decode.tree == "dynamic":
            return f"{decode.method}, dynamic k={decode.k}, L={decode.length}, {decode.node_budget} nodes"
        return f"{decode.method}, k={decode.num_drafts}, L={decode.length}, rule {decode.rule_name}"
