"""BlockManager: hands out fixed-size KV blocks from one preallocated pool. Plain Python, no torch.

Block ids index the first dimension of every layer's K/V cache tensor. A sequence's block table
maps its token at position p to slot block_table[p // block_size] * block_size + p % block_size.
No prefix sharing yet, so every allocated block has exactly one owner; ownership is tracked so a
double free or a foreign block table is caught at once instead of silently corrupting the pool.
"""

from __future__ import annotations

from .sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: recently freed blocks are reused first (warm in cache, and easy to reason about).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._owner: dict[int, int] = {}  # block id -> seq_id

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still lacks to hold KV entries for its first `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        return self.num_missing_blocks(seq, num_tokens) + reserve <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` so it covers `num_tokens` token slots."""
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > len(self._free):
            raise NoFreeBlocksError(f"seq {seq.seq_id} needs {missing} more blocks, only {len(self._free)} free")
        for _ in range(missing):
            block = self._free.pop()
            self._owner[block] = seq.seq_id
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:  # validate everything before changing anything
            owner = self._owner.get(block)
            if owner != seq.seq_id:
                raise RuntimeError(f"block {block} freed by seq {seq.seq_id} but owned by {owner}")
        for block in reversed(seq.block_table):
            del self._owner[block]
            self._free.append(block)
        seq.block_table = []

    def check_invariants(self) -> None:
        """Every block is either free or owned, exactly once. For tests and debugging."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block appears twice in the free list")
        if free & set(self._owner):
            raise AssertionError("a block is both free and owned")
        if len(free) + len(self._owner) != self.num_blocks:
            raise AssertionError("blocks leaked: neither free nor owned")
