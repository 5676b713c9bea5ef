"""Text available offline on any machine with Python: the standard library's documentation and source.

Deterministic: the same files in the same order, split by a hash of their name
into training and held-out sets.
"""

from collections.abc import Iterator
import hashlib
import pathlib
import sysconfig

import torch

HELD_OUT_PERCENT = 5


def documents() -> Iterator[tuple[str, str]]:
    """(name, text) pairs: the pydoc topics (prose), then the standard library's modules (code)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name]
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "site-packages", "idlelib"} & set(path.parts):
            continue
        try:
            yield f"module:{path.relative_to(stdlib)}", path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def is_held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def token_chunks(tokenizer, length: int, held_out: bool, limit_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping chunks of `length` tokens from the corpus split. LongTensor [chunks, length]."""
    buffer: list[int] = []
    chunks: list[list[int]] = []
    for name, text in documents():
        if is_held_out(name) != held_out:
            continue
        buffer.extend(tokenizer(text, add_special_tokens=False).input_ids)
        while len(buffer) >= length:
            chunks.append(buffer[:length])
            buffer = buffer[length:]
        if limit_tokens is not None and len(chunks) * length >= limit_tokens:
            break
    return torch.tensor(chunks, dtype=torch.long)
