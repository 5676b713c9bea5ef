"""A static key/value cache whose rollback and commit are index operations.

Slots 0..length-1 hold the keys and values of the tokens seen so far, in
order. A forward over T new tokens writes slots length..length+T-1 and moves
`length` on. Rejecting speculated tokens is `truncate(n)` (nothing is
erased: later writes overwrite); committing the accepted path of a draft
tree is `commit(prefix, slots)`, which moves only the path's slots down, so a
step's bookkeeping is proportional to what it accepted, never to the context.
"""

import torch
from torch import Tensor

from spectr.errors import ContextOverflowError, InvalidInputError


class KVCache:
    def __init__(
        self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
        transposed: bool = False,
    ):
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)  # [layers, B, kv_heads, capacity, head_dim]
        self.values = torch.zeros(shape, dtype=dtype)
        # The keys again, transposed by tiles of 16 slots, [layers, B, kv_heads, tiles, head_dim, 16] (slot s
        # at tile s // 16, lane s % 16), for an attention kernel that scores 16 slots an instruction and
        # reads a tile in order; kept in step with `keys` by write and commit.
        tiles = -(-capacity // 16)
        self.keys_t = torch.zeros(shape[:3] + (tiles, head_dim, 16), dtype=dtype) if transposed else None
        self.capacity = capacity
        self.length = 0
        # SparQ drafts' mean-value correction: float64 sums of each layer's values over slots 0..summed-1
        # ([layers, B, kv_heads, head_dim], made on first use), moved as those slots change, so a step costs
        # the slots it moved, not the context. summed <= length always: writes never touch what is summed.
        self.value_sums: Tensor | None = None
        self.summed = 0

    def reserve(self, count: int) -> int:
        """Check that `count` more tokens fit; return the first slot they will use."""
        if self.length + count > self.capacity:
            raise ContextOverflowError(
                f"the KV cache holds {self.capacity} tokens; {self.length} are in use and {count} more were given"
            )
        return self.length

    def write(self, layer: int, start: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store keys/values [B, kv_heads, T, head_dim] at slots start.. and return all slots up to them."""
        end = start + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        if self.keys_t is not None:
            slots = torch.arange(start, end)
            self.keys_t[layer][:, :, slots // 16, :, slots % 16] = keys.permute(2, 0, 1, 3)  # [T, B, G, E]
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def value_means(self, upto: int) -> Tensor:
        """float32 [layers, B, kv_heads, head_dim]: each layer's mean value over slots 0..upto-1 (zero where
        upto is 0), from the running sums."""
        if not 0 <= upto <= self.length:
            raise InvalidInputError(f"the cache holds {self.length} slots; a mean over {upto} was asked for")
        if self.value_sums is None:
            self.value_sums = torch.zeros(self.values.shape[:3] + self.values.shape[4:], dtype=torch.float64)
        self._sum_to(upto)
        return (self.value_sums / max(upto, 1)).float()

    def _sum_to(self, upto: int) -> None:
        if self.value_sums is None or upto == self.summed:  # nothing summed yet, or nothing to move
            return
        if upto == 0:
            self.value_sums.zero_()
            self.summed = 0
            return
        low, high = sorted((self.summed, upto))
        moved = self.values[:, :, :, low:high]
        # A step's few slots are summed in float64, exactly undone when they move back; a prompt's thousands
        # in float32 first (a float64 copy of a 4k-slot cache took 13x as long).
        moved = moved.double().sum(3) if high - low <= 512 else moved.sum(3).double()
        self.value_sums += moved if upto > self.summed else -moved
        self.summed = upto

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on."""
        if not 0 <= length <= self.length:
            raise InvalidInputError(f"cannot truncate a cache of length {self.length} to {length}")
        if self.summed > length:
            self._sum_to(length)
        self.length = length

    def commit(self, prefix: int, slots: list[int]) -> None:
        """Keep slots 0..prefix-1 and then `slots` (strictly increasing, all >= prefix), moved down to
        prefix..prefix+len(slots)-1. Costs O(len(slots)) — the accepted path — whatever the context."""
        if not 0 <= prefix <= self.length:
            raise InvalidInputError(f"cannot commit a prefix of {prefix} slots in a cache of length {self.length}")
        if slots:
            if slots[0] < prefix or slots[-1] >= self.length:
                raise InvalidInputError(f"commit() slots must lie in [{prefix}, {self.length}), got {slots}")
            if any(b <= a for a, b in zip(slots, slots[1:])):
                raise InvalidInputError(f"commit() slots must be strictly increasing, got {slots}")
        moved = next((i for i, slot in enumerate(slots) if slot != prefix + i), len(slots))  # kept in place
        if self.summed > prefix + moved:  # the value sums must cover no slot that changes or goes
            self._sum_to(prefix + moved)
        if moved < len(slots):
            source = torch.tensor(slots[moved:])
            target = slice(prefix + moved, prefix + len(slots))
            self.keys[:, :, :, target] = self.keys[:, :, :, source]
            if self.keys_t is not None:
                into = torch.arange(target.start, target.stop)
                self.keys_t[:, :, :, into // 16, :, into % 16] = self.keys_t[:, :, :, source // 16, :, source % 16]
            self.values[:, :, :, target] = self.values[:, :, :, source]
        self.length = prefix + len(slots)
