"""Seeded random streams: a seed and a few keys -> a generator, the same in every process.

A stage derives its generator from (global seed, keys such as a sample id), so what it draws
depends on neither batch size, worker count nor scheduling order. `seeded_generator` gives a
torch.Generator seeded with `stream_seed` (63 bits of sha1 of the parts joined with '|');
`seeded_rng` a numpy Generator whose SeedSequence entropy is the seed followed by the keys (a str
key as the first 64 bits of its sha256). Only `seeded_generator` imports torch, so numpy-only
stages (the degradation) use this module without it.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch

Key = Union[int, str]


def stream_seed(*parts) -> int:
    """A 63-bit seed from sha1 of the parts joined with '|'."""
    digest = hashlib.sha1("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(seed: int, *keys, device=None) -> "torch.Generator":
    """A torch.Generator on `device` (default: the CPU) seeded with `stream_seed(seed, *keys)`."""
    import torch  # here, not at the top: the numpy-only callers of this module never load torch

    generator = torch.Generator() if device is None else torch.Generator(device=device)
    return generator.manual_seed(stream_seed(seed, *keys))


def key_entropy(key: Key) -> int:
    """A key as SeedSequence entropy: an int as itself, a str as the first 64 bits (little-endian)
    of its sha256."""
    if isinstance(key, str):
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return int(key)


def seeded_rng(seed: int, *keys: Key) -> np.random.Generator:
    """A numpy Generator from SeedSequence([seed, *keys]) (str keys hashed by `key_entropy`)."""
    return np.random.default_rng([int(seed), *(key_entropy(k) for k in keys)])
