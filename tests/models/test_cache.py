"""KVCache rollback and commit as index operations, on literal slot contents."""

import pytest
import torch

from spectr.errors import ContextOverflowError, InvalidInputError
from spectr.models import KVCache


def _filled(length: int) -> KVCache:
    cache = KVCache(num_layers=2, batch=1, num_kv_heads=1, capacity=8, head_dim=1, dtype=torch.float32)
    slots = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1)
    for layer in range(2):
        cache.write(layer, 0, slots + 100 * layer, -slots)
    cache.length = length
    return cache


def _slots(cache: KVCache, layer: int = 0) -> list[float]:
    return cache.keys[layer, 0, 0, : cache.length, 0].tolist()


def test_commit_moves_the_path_down_in_order():
    cache = _filled(7)
    cache.commit(3, [4, 6])
    assert cache.length == 5
    assert _slots(cache) == [0, 1, 2, 4, 6]
    assert _slots(cache, layer=1) == [100, 101, 102, 104, 106]
    assert cache.values[0, 0, 0, :5, 0].tolist() == [0, -1, -2, -4, -6]


def test_commit_prefix_only_and_truncate():
    cache = _filled(6)
    cache.commit(3, [])
    assert _slots(cache) == [0, 1, 2]
    cache = _filled(6)
    cache.truncate(2)
    assert cache.length == 2 and _slots(cache) == [0, 1]
    assert cache.reserve(3) == 2


def test_bad_operations_are_named():
    cache = _filled(4)
    with pytest.raises(InvalidInputError, match="strictly increasing"):
        cache.commit(1, [3, 2])
    with pytest.raises(InvalidInputError, match="must lie in"):
        cache.commit(1, [4])
    with pytest.raises(InvalidInputError, match="must lie in"):
        cache.commit(2, [1])
    with pytest.raises(InvalidInputError, match="cannot commit a prefix"):
        cache.commit(5, [])
    with pytest.raises(InvalidInputError, match="cannot truncate"):
        cache.truncate(5)
    with pytest.raises(ContextOverflowError, match="holds 8 tokens; 4 are in use and 5 more"):
        cache.reserve(5)
    assert _slots(cache) == [0, 1, 2, 3]  # untouched by the refused calls


def test_commit_nothing_empties_the_cache():
    cache = _filled(5)
    cache.commit(0, [])
    assert cache.length == 0
    cache.write(0, 0, torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1))  # and it fills again from slot 0
    cache.length = 1
    assert _slots(cache) == [1.0]


def test_the_transposed_keys_follow_writes_and_commits():
    # 40 slots: three tiles of 16, the last partly used; the path moves across a tile boundary.
    cache = KVCache(num_layers=2, batch=1, num_kv_heads=2, capacity=40, head_dim=3, dtype=torch.float32, transposed=True)
    keys = torch.randn(2, 1, 2, 37, 3)
    for layer in range(2):
        cache.write(layer, 0, keys[layer, :, :, :30], torch.zeros(1, 2, 30, 3))
        cache.write(layer, 30, keys[layer, :, :, 30:], torch.zeros(1, 2, 7, 3))
    cache.length = 37
    cache.commit(12, [14, 20, 33])
    kept = list(range(12)) + [14, 20, 33]
    assert torch.equal(cache.keys[:, :, :, :15], keys[:, :, :, kept])
    layers, batch, heads, tiles, head_dim, _ = cache.keys_t.shape
    untiled = cache.keys_t.transpose(-1, -2).reshape(layers, batch, heads, tiles * 16, head_dim)
    assert torch.equal(untiled[:, :, :, :15], keys[:, :, :, kept])
