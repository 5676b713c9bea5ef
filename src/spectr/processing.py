"""Logits → the one processed distribution that target and draft are compared under.

Logit bias, repetition / presence / frequency penalties, temperature, top-k and
top-p are applied identically to both models (SPECTR.md: p and q are the
distributions *after* processing), so the rules stay exact with respect to the
processed target. Temperature 0 is greedy: a point mass on the argmax (the
first one on ties), which turns every rule into "accept iff the draft token is
the target's argmax".

Penalties read the text, so the processed law at a tree node depends on the
node's path: a node's row counts the generated tokens so far (`TokenHistory`)
plus the tokens on its path from the root, for target and draft alike. The
order is vLLM's: bias, repetition penalty, frequency and presence penalties,
then temperature, top-k, top-p.
"""

from dataclasses import dataclass, field
import math

import torch
from torch import Tensor

from spectr.errors import InvalidInputError

NUCLEUS_SHORTLIST = 512  # top-p first looks among this many most likely tokens (a full sort is slow on CPU)
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit bias


class TokenHistory:
    """What penalties read of one generation's text: how often each token was generated (presence and
    frequency penalties count the output, as OpenAI and vLLM do) and which tokens the text holds, prompt
    included (the repetition penalty's set, as in transformers and vLLM). Updated with each step's emitted
    tokens, so a step's work does not grow with the context."""

    def __init__(self, vocab_size: int, prompt: list[int]):
        self.counts = torch.zeros(vocab_size)  # float32: subtracted from float32 logits
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self.seen[torch.tensor(prompt, dtype=torch.long)] = True

    def extend(self, tokens: list[int]) -> None:
        ids = torch.tensor(tokens, dtype=torch.long)
        self.counts.index_add_(0, ids, torch.ones(ids.numel()))
        self.seen[ids] = True


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # times how many times it was generated
    repetition_penalty: float = 1.0  # tokens of the text (prompt too): logits > 0 divided by it, < 0 multiplied
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    # The generation these params are applied in (penalties read it); the decoder sets it per generation.
    history: TokenHistory | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidInputError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise InvalidInputError(f"{name} must be a number in [-2, 2] (OpenAI's range), got {value!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidInputError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                                    f"got {self.repetition_penalty!r}")
        if len({entry[0] for entry in self.logit_bias if isinstance(entry, tuple) and entry}) != len(self.logit_bias):
            raise InvalidInputError("logit_bias names a token twice")
        for entry in self.logit_bias:
            token, bias = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, None)
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise InvalidInputError(f"logit_bias keys must be token ids (ints >= 0), got {entry!r}")
            if not isinstance(bias, (int, float)) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidInputError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} "
                                        f"for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def reads_history(self) -> bool:
        """Whether the processed law depends on the text (a penalty is on)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


def logits_to_probs(logits: Tensor, params: SamplingParams, paths: list[list[int]] | None = None) -> Tensor:
    """Processed next-token distributions. logits [N, V] -> probs [N, V] float32.

    paths: with a penalty on, the tokens each row's context adds to `params.history` (a tree node's path from
    the root, the root excluded: it is in the history already); None: every row is at the history itself.
    """
    logits = logits.float()
    if params.logit_bias or params.reads_history:
        logits = adjust_logits(logits, params, paths)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k, dim=-1).values[:, -1:]  # [N, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    if params.top_p < 1:
        probs = _nucleus(probs, params.top_p)
    return probs


def adjust_logits(logits: Tensor, params: SamplingParams, paths: list[list[int]] | None = None) -> Tensor:
    """Logit bias, then the penalties of each row's text (see logits_to_probs). [N, V] float32 -> new tensor."""
    rows, vocab = logits.shape
    adjusted = logits.clone()
    if params.logit_bias:
        tokens = torch.tensor([token for token, _ in params.logit_bias], dtype=torch.long)
        if int(tokens.max()) >= vocab:
            raise InvalidInputError(f"logit_bias names token {int(tokens.max())}; the vocabulary has {vocab} tokens")
        adjusted[:, tokens] += torch.tensor([bias for _, bias in params.logit_bias], dtype=adjusted.dtype)
    if not params.reads_history:
        return adjusted
    history = params.history
    if history is None:
        raise InvalidInputError("penalties read the generation's text: these params have no TokenHistory "
                                "(the decoder sets one per generation)")
    counts, seen = history.counts[None].expand(rows, vocab), history.seen[None].expand(rows, vocab)
    if paths is not None and any(paths):
        if len(paths) != rows:
            raise InvalidInputError(f"{len(paths)} paths for {rows} rows of logits")
        counts, seen = counts.clone(), seen.clone()
        for row, path in enumerate(paths):
            if path:
                ids = torch.tensor(path, dtype=torch.long)
                counts[row].index_add_(0, ids, torch.ones(ids.numel()))
                seen[row, ids] = True
    if params.repetition_penalty != 1:
        penalized = torch.where(adjusted > 0, adjusted / params.repetition_penalty,
                                adjusted * params.repetition_penalty)
        adjusted = torch.where(seen, penalized, adjusted)
    if params.frequency_penalty:
        adjusted = adjusted - params.frequency_penalty * counts
    if params.presence_penalty:
        adjusted = adjusted - params.presence_penalty * (counts > 0).to(adjusted.dtype)
    return adjusted


def node_paths(tokens: list[int], parents: list[int], nodes) -> list[list[int]]:
    """The tokens from the root down to each of `nodes` (the node's own included), of a tree given as
    tokens / parents lists (−1: a child of the root): what a node's context adds to the text."""
    paths = []
    for node in nodes:
        path = []
        while node >= 0:
            path.append(tokens[node])
            node = parents[node]
        paths.append(path[::-1])
    return paths


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p, renormalised. [N, V]"""
    shortlist = min(NUCLEUS_SHORTLIST, probs.shape[-1])
    values, indices = probs.topk(shortlist, dim=-1)  # [N, S] descending
    if shortlist < probs.shape[-1] and bool((values.sum(-1) < top_p).any()):
        values, indices = probs.sort(dim=-1, descending=True)  # the shortlist misses the nucleus
    mass_before = values.cumsum(-1) - values  # [N, S] mass of the strictly more likely tokens
    kept = torch.zeros_like(probs).scatter(-1, indices, (mass_before < top_p).to(probs.dtype))
    nucleus = probs * kept
    return nucleus / nucleus.sum(-1, keepdim=True)


@dataclass(frozen=True)
class TokenLogprob:
    """An emitted token's log-probability under the processed law it was emitted from, and the `top` likeliest
    tokens of that law (only tokens it can emit: a greedy law has one)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(probs: Tensor, token: int, top: int = 0) -> TokenLogprob:
    """The TokenLogprob of `token` under one processed law probs [V]."""
    logprob = math.log(float(probs[token]))
    if top <= 0:
        return TokenLogprob(token, logprob)
    values, ids = probs.topk(min(top, int((probs > 0).sum())))
    return TokenLogprob(token, logprob, tuple((int(i), math.log(float(v))) for i, v in zip(ids, values)))
