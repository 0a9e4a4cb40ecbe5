"""Seed derivation: one root seed -> every random choice of a run.

Each purpose gets its own ``numpy.random.SeedSequence`` branch, keyed further by round
and client, so adding a draw in one place never shifts the numbers drawn elsewhere.
Library code never touches the global ``random`` / ``np.random`` / ``torch`` generators.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _purpose_key(purpose: str) -> int:
    # Stable across processes and Python versions (unlike hash()).
    return zlib.crc32(purpose.encode("utf-8"))


def seed_sequence(root_seed: int, purpose: str, *keys: int) -> np.random.SeedSequence:
    """The SeedSequence for ``purpose`` (e.g. "partition", "sample") and integer keys."""
    if root_seed < 0:
        raise ValueError(f"seed must be >= 0, got {root_seed}")
    spawn_key = (_purpose_key(purpose), *(int(k) for k in keys))
    return np.random.SeedSequence(entropy=root_seed, spawn_key=spawn_key)


def np_rng(root_seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A numpy Generator for one purpose (and round / client keys)."""
    return np.random.default_rng(seed_sequence(root_seed, purpose, *keys))


def int_seed(root_seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit integer seed, for libraries that take an int."""
    state = seed_sequence(root_seed, purpose, *keys).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def torch_generator(
    root_seed: int, purpose: str, *keys: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A torch Generator for one purpose (and round / client keys)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int_seed(root_seed, purpose, *keys))
    return gen
