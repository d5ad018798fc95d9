"""The block pool: KV memory of hot agents, counted in fixed-size token blocks.

Capacity is SEMANTIC_MLX_CACHE_BUDGET_MB divided by the bytes of one block, computed from the loaded
model (layers x KV heads x head dim x 2 x dtype size x block tokens). A block holds
`block_tokens` tokens of one sequence. Blocks are reference counted: a fork shares its parent's full
prefix blocks until it writes, when it gets blocks of its own (copy on write).

Block size: 64 tokens by default (SEMANTIC_MLX_BLOCK_TOKENS). Smaller blocks make prefix lookup find
shorter shared prefixes (system prompts are often under 256 tokens) and keep the overshoot of a
running sequence small (at most one partial block: 2.9 MB for SmolLM2 in float32); larger blocks
make the per-request hashing and bookkeeping cheaper. mlx-lm grows its cache buffers in steps of
256 tokens, a multiple of 64, so accounting never needs to split one of its steps.

The pool is bookkeeping, not an allocator of tensors: MLX owns the arrays. It is what makes the
budget a real cap, because nothing becomes hot without blocks from here. Not thread-safe: only the
engine thread calls it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from semantic_core.errors import PoolExhausted


@dataclass(frozen=True)
class PoolStats:
    capacity: int
    used: int
    free: int
    shared: int  # blocks referenced by more than one owner
    block_tokens: int
    bytes_per_block: int

    @property
    def utilization(self) -> float:
        return self.used / self.capacity if self.capacity else 0.0

    @property
    def used_bytes(self) -> int:
        return self.used * self.bytes_per_block

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * self.bytes_per_block


class BlockPool:
    def __init__(self, capacity: int, block_tokens: int, bytes_per_block: int) -> None:
        if capacity < 1:
            raise PoolExhausted(
                "the KV cache budget holds no block at all: raise SEMANTIC_MLX_CACHE_BUDGET_MB",
                never_fits=True,
            )
        self.capacity = capacity
        self.block_tokens = block_tokens
        self.bytes_per_block = bytes_per_block
        # Pop from the end: low block ids are handed out first, which keeps the block map readable.
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._refs: dict[int, Counter[str]] = {}

    @classmethod
    def from_budget(cls, budget_mb: float, block_tokens: int, bytes_per_token: int) -> BlockPool:
        bytes_per_block = block_tokens * bytes_per_token
        return cls(int(budget_mb * 1024 * 1024) // bytes_per_block, block_tokens, bytes_per_block)

    # Sizes ---------------------------------------------------------------------------------------

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens) if tokens > 0 else 0

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def utilization(self) -> float:
        return self.used / self.capacity

    def stats(self) -> PoolStats:
        shared = sum(1 for owners in self._refs.values() if sum(owners.values()) > 1)
        return PoolStats(self.capacity, self.used, self.free, shared, self.block_tokens, self.bytes_per_block)

    # Operations ----------------------------------------------------------------------------------

    def allocate(self, owner: str, n: int) -> list[int]:
        if n <= 0:
            return []
        if n > len(self._free):
            raise PoolExhausted(f"{n} KV blocks wanted, {len(self._free)} free of {self.capacity}")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = Counter({owner: 1})
        return blocks

    def share(self, owner: str, blocks: list[int]) -> None:
        """`owner` takes a reference to blocks someone already holds (a forked prefix)."""
        for b in blocks:
            if b not in self._refs:
                raise ValueError(f"block {b} is not allocated")
        for b in blocks:
            self._refs[b][owner] += 1

    def release(self, owner: str, blocks: list[int]) -> None:
        for b in blocks:
            refs = self._refs.get(b)
            if refs is None or refs[owner] <= 0:
                raise ValueError(f"{owner!r} holds no reference to block {b}")
            refs[owner] -= 1
            if refs[owner] == 0:
                del refs[owner]
            if not refs:
                del self._refs[b]
                self._free.append(b)

    def refcount(self, block: int) -> int:
        return sum(self._refs.get(block, Counter()).values())

    def owners(self, block: int) -> list[str]:
        return sorted(self._refs.get(block, Counter()))

    def owned_by(self, owner: str) -> tuple[int, int]:
        """(blocks held only by `owner`, blocks `owner` shares with others)."""
        own = shared = 0
        for refs in self._refs.values():
            if owner in refs:
                if len(refs) == 1:
                    own += 1
                else:
                    shared += 1
        return own, shared

    def block_map(self) -> dict[int, tuple[str, ...]]:
        """Owners of every block in use, by block id (absent = free), for the pool inspector.
        Costs O(blocks in use), not O(capacity): large pools are mostly free."""
        return {b: tuple(sorted(refs)) for b, refs in self._refs.items()}
