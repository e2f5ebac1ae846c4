"""Ways to split a wire transcript into the chunks a machine is fed.

Every sans-IO machine must give the same events whether bytes arrive whole, one at a
time, or in arbitrary pieces; tests parametrize over these.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

Splitter = Callable[[bytes], list[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_splits(data: bytes, seed: int = 5321) -> list[bytes]:
    rng = random.Random(seed)
    pieces, pos = [], 0
    while pos < len(data):
        step = rng.randint(1, 40)
        pieces.append(data[pos : pos + step])
        pos += step
    return pieces


SPLITTERS = pytest.mark.parametrize(
    "split", [whole, bytewise, random_splits], ids=["whole", "bytewise", "random"]
)
"""Whole, byte by byte, and random pieces: for transcripts."""

chunkings = pytest.mark.parametrize("chunks", [whole, bytewise], ids=["whole", "bytewise"])
"""Whole and byte by byte: for transcripts checked at every byte boundary."""
