"""Prefix lookup over every agent's cached tokens, at block granularity.

Each full block of an agent's tokens gets a chained hash: the hash of block i covers the tokens of
blocks 0..i (as in vLLM's prefix caching), so equal hashes at position i mean equal prefixes of
(i + 1) blocks, up to hash collisions, which the caller rules out by comparing tokens. A lookup walks
the request's block hashes while some agent still shares them, then measures the exact common
prefix (token granularity) against the few agents left.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def block_hashes(tokens: Sequence[int], block_tokens: int) -> list[int]:
    hashes: list[int] = []
    prev = 0
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        prev = hash((prev, tuple(tokens[start : start + block_tokens])))
        hashes.append(prev)
    return hashes


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in slices first: far faster than a Python loop over every token.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True)
class PrefixMatch:
    agent_id: str
    length: int  # tokens in common with the request


class PrefixIndex:
    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._by_hash: dict[int, set[str]] = {}
        self._hashes: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._hashes)

    def set(self, agent_id: str, tokens: Sequence[int]) -> None:
        self.remove(agent_id)
        hashes = block_hashes(tokens, self.block_tokens)
        self._hashes[agent_id] = hashes
        for h in hashes:
            self._by_hash.setdefault(h, set()).add(agent_id)

    def remove(self, agent_id: str) -> None:
        for h in self._hashes.pop(agent_id, []):
            owners = self._by_hash.get(h)
            if owners is not None:
                owners.discard(agent_id)
                if not owners:
                    del self._by_hash[h]

    def candidates(self, tokens: Sequence[int], eligible: Iterable[str] | None = None) -> tuple[int, builtins.set[str]]:
        """(blocks matched, agents sharing that many blocks) for the deepest match."""
        allowed = set(eligible) if eligible is not None else None
        best_depth, best = 0, set()
        prev = 0
        for depth, start in enumerate(range(0, len(tokens) - self.block_tokens + 1, self.block_tokens), 1):
            prev = hash((prev, tuple(tokens[start : start + self.block_tokens])))
            owners = self._by_hash.get(prev)
            if allowed is not None and owners:
                owners = owners & allowed
            if not owners:
                break
            best_depth, best = depth, set(owners)
        return best_depth, best
