"""Lookup-table language models behind spectr's forward interface, for exact sequence-level tests.

The next-token logits depend on the current token and the one before it
(found through the attention mask, so tree masks and cache commits are really
exercised): logits = table[previous, current], previous = BOS at position 0.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from spectr.models.base import ForwardOutput
from spectr.models.llama import causal_mask


class TokenCache:
    """Stands in for a KV cache: remembers each slot's token and position."""

    def __init__(self, capacity: int):
        self.tokens = torch.zeros(capacity, dtype=torch.long)
        self.positions = torch.zeros(capacity, dtype=torch.long)
        self.capacity = capacity
        self.length = 0

    def truncate(self, length: int) -> None:
        assert 0 <= length <= self.length
        self.length = length

    def commit(self, prefix: int, slots: list[int]) -> None:
        assert 0 <= prefix <= self.length and all(prefix <= s < self.length for s in slots)
        count = prefix + len(slots)
        self.tokens[prefix:count] = self.tokens[slots].clone()
        self.positions[prefix:count] = self.positions[slots].clone()
        self.length = count


@dataclass(frozen=True)
class LookupConfig:
    vocab_size: int
    context_length: int = 64


class LookupTableLM:
    backend = "lookup"

    def __init__(self, table: Tensor):
        self.table = table  # [V + 1, V, V] logits by (previous or BOS, current)
        self.config = LookupConfig(vocab_size=table.shape[-1])

    @classmethod
    def random(cls, vocab: int, seed: int, sharpness: float = 2.0) -> "LookupTableLM":
        generator = torch.Generator().manual_seed(seed)
        return cls(sharpness * torch.randn(vocab + 1, vocab, vocab, generator=generator, dtype=torch.float64))

    def next_probs(self, previous: int | None, current: int) -> Tensor:
        row = self.config.vocab_size if previous is None else previous
        return self.table[row, current].softmax(-1)

    def new_cache(self, capacity: int | None = None, batch: int = 1) -> TokenCache:
        return TokenCache(capacity or self.config.context_length)

    def forward(self, tokens, positions, cache: TokenCache, attention_mask=None, logit_indices=None):
        new = tokens.shape[1]
        mask = causal_mask(cache.length, new) if attention_mask is None else attention_mask
        start = cache.length
        assert start + new <= cache.capacity
        cache.tokens[start : start + new] = tokens[0]
        cache.positions[start : start + new] = positions.reshape(-1)[-new:]
        cache.length += new
        logits = []
        for i in range(new):
            seen = mask[i].nonzero().flatten()
            position = int(cache.positions[start + i])
            before = seen[cache.positions[seen] == position - 1]
            assert position == 0 or before.numel() == 1, "the mask must show exactly one previous token"
            previous = int(cache.tokens[before[0]]) if position else self.config.vocab_size
            logits.append(self.table[previous, int(tokens[0, i])])
        logits = torch.stack(logits)[None].float()
        if logit_indices is not None:
            logits = logits[:, logit_indices]
        return ForwardOutput(logits=logits, hidden=logits)
