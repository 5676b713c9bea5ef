"""A static key/value cache whose rollback and commit are index operations.

Slots 0..length-1 hold the keys and values of the tokens seen so far, in
order. A forward over T new tokens writes slots length..length+T-1 and moves
`length` on. Rejecting speculated tokens is `truncate(n)` (nothing is
erased: later writes overwrite); committing the accepted path of a draft
tree is `keep(indices)`, which moves the kept slots down in place.
"""

import torch
from torch import Tensor

from spectr.errors import ContextOverflowError, InvalidInputError


class KVCache:
    def __init__(
        self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype
    ):
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)  # [layers, B, kv_heads, capacity, head_dim]
        self.values = torch.zeros(shape, dtype=dtype)
        self.capacity = capacity
        self.length = 0

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
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on."""
        if not 0 <= length <= self.length:
            raise InvalidInputError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def keep(self, indices: Tensor | list[int]) -> None:
        """Keep only the slots `indices` (strictly increasing), moved down to 0..len(indices)-1.

        Only the slots after the longest untouched prefix are copied, so keeping
        the committed text plus an accepted path costs O(path length).
        """
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.ndim != 1:
            raise InvalidInputError(f"keep() takes a 1-D list of slots, got shape {tuple(indices.shape)}")
        if indices.numel():
            if int(indices[0]) < 0 or int(indices[-1]) >= self.length:
                raise InvalidInputError(f"keep() slots must lie in [0, {self.length}), got {indices.tolist()}")
            if bool((indices[1:] <= indices[:-1]).any()):
                raise InvalidInputError(f"keep() slots must be strictly increasing, got {indices.tolist()}")
        moved = indices != torch.arange(indices.numel())
        first = int(moved.to(torch.int8).argmax()) if bool(moved.any()) else indices.numel()
        source = indices[first:]
        if source.numel():
            self.keys[:, :, :, first : indices.numel()] = self.keys[:, :, :, source]
            self.values[:, :, :, first : indices.numel()] = self.values[:, :, :, source]
        self.length = indices.numel()
