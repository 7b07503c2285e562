import random

import pytest

from modelyard.engine.block_manager import BlockManager, NoFreeBlocksError
from modelyard.engine.sequence import Sequence
from modelyard.engine.types import SamplingParams


def _seq(i, n=5):
    return Sequence(seq_id=i, prompt_token_ids=list(range(1, n + 1)), sampling=SamplingParams(max_new_tokens=4))


def test_allocate_grows_to_cover_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = _seq(0)
    assert bm.blocks_for(0) == 0 and bm.blocks_for(4) == 1 and bm.blocks_for(5) == 2
    bm.allocate(s, 5)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 6
    bm.allocate(s, 8)  # still fits in two blocks
    assert len(s.block_table) == 2
    bm.allocate(s, 9)
    assert len(s.block_table) == 3 and bm.num_used_blocks == 3
    assert len(set(s.block_table)) == 3
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks == 8
    bm.check_invariants()


def test_exhaustion_raises_and_leaves_state_intact():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = _seq(0), _seq(1)
    bm.allocate(a, 4)
    assert not bm.can_allocate(b, 4)
    assert bm.can_allocate(b, 2)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(b, 4)
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert not bm.can_allocate(b, 2, reserve=1)
    bm.check_invariants()


def test_double_free_and_foreign_blocks_are_caught():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = _seq(0), _seq(1)
    bm.allocate(a, 2)
    b.block_table = list(a.block_table)  # b claims a's block
    with pytest.raises(RuntimeError, match="owned by"):
        bm.free(b)
    bm.free(a)
    a.block_table = [0]
    with pytest.raises(RuntimeError):
        bm.free(a)


def test_random_alloc_free_never_leaks_or_shares():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=50, block_size=3)
    live = {}
    for step in range(2000):
        if live and rng.random() < 0.4:
            sid = rng.choice(list(live))
            bm.free(live.pop(sid))
        else:
            sid = step
            s = _seq(sid)
            n = rng.randint(1, 40)
            if bm.can_allocate(s, n):
                bm.allocate(s, n)
                live[sid] = s
        owned = [b for s in live.values() for b in s.block_table]
        assert len(owned) == len(set(owned)) == bm.num_used_blocks
    for s in live.values():
        bm.free(s)
    assert bm.num_free_blocks == 50
    bm.check_invariants()


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
