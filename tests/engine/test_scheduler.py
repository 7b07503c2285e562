"""Scheduler + block manager driven by a fake model that checks every KV entry it reads."""

import random

import pytest

from modelyard.engine.block_manager import BlockManager
from modelyard.engine.scheduler import Scheduler, SchedulerConfig
from modelyard.engine.sequence import Sequence, SequenceStatus
from modelyard.engine.types import SamplingParams

EOS = 2


def _sched(num_blocks=64, block_size=4, max_batch_size=8, max_prefill_tokens=32, max_model_len=256, reserve=True):
    bm = BlockManager(num_blocks, block_size)
    cfg = SchedulerConfig(
        max_batch_size=max_batch_size,
        max_prefill_tokens=max_prefill_tokens,
        max_model_len=max_model_len,
        eos_token_ids=frozenset({EOS}),
        reserve_decode_blocks=reserve,
    )
    return Scheduler(cfg, bm)


def _seq(i, prompt_len, max_new, ignore_eos=True):
    prompt = [10 + (i * 7 + j) % 50 for j in range(prompt_len)]
    return Sequence(
        seq_id=i, prompt_token_ids=prompt, sampling=SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos)
    )


class FakeModel:
    """A "model" whose next token is a hash of every token so far, read back from its paged KV.

    It writes (seq_id, position, token) into the slot of each processed token and reads the whole
    prefix back through the block table, so any block shared by two live sequences, freed too
    early, or mapped wrongly makes the tokens (or an assertion) differ.
    """

    def __init__(self, block_size, eos_mod=0):
        self.bs = block_size
        self.eos_mod = eos_mod  # > 0: a hash divisible by it samples EOS
        self.slots = {}

    def run(self, out):
        sampled = {}
        for span in out.seqs:
            assert len(span.block_table) * self.bs >= span.seq_len
            for k, tok in enumerate(span.token_ids):
                p = span.start_pos + k
                self.slots[span.block_table[p // self.bs] * self.bs + p % self.bs] = (span.seq_id, p, tok)
            if span.sample:
                prefix = [
                    self.slots[span.block_table[p // self.bs] * self.bs + p % self.bs] for p in range(span.seq_len)
                ]
                assert all(sid == span.seq_id and pos == p for p, (sid, pos, _) in enumerate(prefix))
                h = 0
                for _, _, t in prefix:
                    h = (h * 31 + t) % 1000003
                sampled[span.seq_id] = EOS if self.eos_mod and h % self.eos_mod == 0 else 3 + h % 97
        return sampled


def _drive(sched, seqs, max_steps=100000, eos_mod=0, on_step=None):
    model = FakeModel(sched.block_manager.block_size, eos_mod)
    for s in seqs:
        sched.add(s)
    finished, steps = {}, []
    while sched.has_unfinished():
        out = sched.schedule()
        assert not out.is_empty, "scheduler stalled with unfinished work"
        steps.append(out)
        assert len(sched.running) <= sched.config.max_batch_size
        if out.is_prefill:
            assert out.num_tokens <= sched.config.max_prefill_tokens
        else:
            assert all(s.num_tokens == 1 and s.sample for s in out.seqs)
        for s in sched.update(out, model.run(out)):
            finished[s.seq_id] = s
        sched.block_manager.check_invariants()
        if on_step is not None:
            on_step(sched, out)
        assert len(steps) < max_steps
    return finished, steps


def _reference_tokens(prompt_len_and_new, block_size=4, ignore_eos=True, eos_mod=0):
    """Same workload, one sequence at a time in a huge pool: no chunking, no preemption."""
    out = {}
    for i, (plen, new) in prompt_len_and_new.items():
        sched = _sched(num_blocks=1000, block_size=block_size, max_prefill_tokens=10000)
        fin, _ = _drive(sched, [_seq(i, plen, new, ignore_eos)], eos_mod=eos_mod)
        out[i] = fin[i].output_token_ids
    return out


def test_prefill_then_decode_and_blocks_all_free():
    sched = _sched()
    fin, steps = _drive(sched, [_seq(i, 5 + i, 6) for i in range(4)])
    assert steps[0].is_prefill and len(steps[0].seqs) == 4
    assert all(not s.is_prefill for s in steps[1:])
    assert all(len(f.output_token_ids) == 6 and f.finish_reason == "length" for f in fin.values())
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert sched.num_preemptions == 0


def test_chunked_prefill_respects_budget_and_matches_unchunked():
    work = {0: (40, 5), 1: (3, 5), 2: (70, 3), 3: (9, 8)}
    sched = _sched(max_prefill_tokens=16)
    fin, steps = _drive(sched, [_seq(i, p, n) for i, (p, n) in work.items()])
    assert max(s.num_tokens for s in steps if s.is_prefill) == 16
    assert sum(1 for s in steps if s.is_prefill) >= 8  # 122 prompt tokens / 16 per step
    ref = _reference_tokens(work)
    assert {i: f.output_token_ids for i, f in fin.items()} == ref


def test_max_batch_size_limits_running():
    sched = _sched(max_batch_size=3)
    fin, steps = _drive(sched, [_seq(i, 4, 5) for i in range(10)])
    assert len(fin) == 10
    assert max(len(s.seqs) for s in steps) <= 3


def test_preemption_recomputes_and_gives_identical_tokens():
    rng = random.Random(1)
    work = {i: (rng.randint(3, 30), rng.randint(5, 40)) for i in range(20)}
    # 20 blocks of 4 = 80 slots; the largest request needs at most 69 slots, so everything fits
    # alone but the batch has to preempt (admitting on current length only, so that it does).
    sched = _sched(num_blocks=20, block_size=4, max_prefill_tokens=24, reserve=False)
    fin, steps = _drive(sched, [_seq(i, p, n) for i, (p, n) in work.items()])
    assert sched.num_preemptions > 0
    assert any(s.preempted for s in steps)
    assert sum(f.num_preemptions for f in fin.values()) == sched.num_preemptions
    assert {i: f.output_token_ids for i, f in fin.items()} == _reference_tokens(work)
    assert sched.block_manager.num_free_blocks == 20


def test_preempts_most_recently_admitted():
    sched = _sched(num_blocks=4, block_size=2, max_prefill_tokens=100, reserve=False)
    a, b = _seq(0, 3, 4), _seq(1, 3, 4)
    sched.add(a)
    sched.add(b)
    model = FakeModel(2)
    out = sched.schedule()
    assert [s.seq_id for s in out.seqs] == [0, 1]
    sched.update(out, model.run(out))  # each holds 3 KV entries in its 2 blocks: pool full
    out = sched.schedule()  # position 3 still fits in the second block
    assert not out.preempted and len(out.seqs) == 2
    sched.update(out, model.run(out))
    out = sched.schedule()  # position 4: a needs a third block, b goes
    assert out.preempted == (1,) and [s.seq_id for s in out.seqs] == [0]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert list(sched.waiting) == [b] and len(b.output_token_ids) == 2


def _growth_never_exceeds_the_pool(sched, out):
    """With every sequence ignoring EOS the reserve is exact: what runs always fits at full length."""
    bm = sched.block_manager
    at_full_length = sum(bm.blocks_for(s.num_prompt_tokens + s.max_new_tokens - 1) for s in sched.running)
    assert at_full_length <= bm.num_blocks


def test_reserve_admits_what_can_grow_and_never_preempts():
    # 8 alike sequences of 8 + 12 tokens (5 blocks of 4 at full length, 2 at admission) in 20 blocks:
    # 4 fit at full length, 10 at admission. Rounds of 4 or 5 both take two, so nothing is overcommitted.
    work = {i: (8, 12) for i in range(8)}
    ref = _reference_tokens(work)
    sched = _sched(num_blocks=20, block_size=4, max_prefill_tokens=100)
    fin, steps = _drive(sched, [_seq(i, p, n) for i, (p, n) in work.items()], on_step=_growth_never_exceeds_the_pool)
    assert sched.num_preemptions == 0 and not any(s.preempted for s in steps)
    assert {i: f.output_token_ids for i, f in fin.items()} == ref
    # Every prompt token was computed once: nothing was recomputed.
    assert sum(s.num_tokens for s in steps if s.is_prefill) == 8 * 8
    assert max(len(s.seqs) for s in steps if not s.is_prefill) == 4
    assert sched.block_manager.num_free_blocks == 20
    # Admitting on current length instead runs out of blocks and recomputes.
    greedy = _sched(num_blocks=20, block_size=4, max_prefill_tokens=100, reserve=False)
    fin, steps = _drive(greedy, [_seq(i, p, n) for i, (p, n) in work.items()])
    assert greedy.num_preemptions > 0 and sum(s.num_tokens for s in steps if s.is_prefill) > 8 * 8
    assert {i: f.output_token_ids for i, f in fin.items()} == ref


def test_reserve_overcommits_by_a_little_when_that_saves_a_round():
    # 5 alike sequences in 22 blocks: 4 fit at full length (20 blocks), the fifth is 3 blocks short,
    # a quarter of the 12 blocks the four still grow by. All five run at once; near the end of the
    # round one is preempted and recomputed, which beats a second round for one sequence.
    work = {i: (8, 12) for i in range(5)}
    sched = _sched(num_blocks=22, block_size=4, max_prefill_tokens=100)
    fin, steps = _drive(sched, [_seq(i, p, n) for i, (p, n) in work.items()])
    assert {i: f.output_token_ids for i, f in fin.items()} == _reference_tokens(work)
    assert max(len(s.seqs) for s in steps if not s.is_prefill) == 5
    assert sched.num_preemptions == 1
    decode_steps = sum(1 for s in steps if not s.is_prefill)
    # One block short more and it no longer pays: one round of four, then the fifth alone.
    strict = _sched(num_blocks=21, block_size=4, max_prefill_tokens=100)
    fin, steps = _drive(strict, [_seq(i, p, n) for i, (p, n) in work.items()])
    assert strict.num_preemptions == 0 and max(len(s.seqs) for s in steps if not s.is_prefill) == 4
    assert sum(1 for s in steps if not s.is_prefill) == 2 * 11 > decode_steps


def test_reserve_learns_the_output_share_of_stopping_sequences():
    rng = random.Random(2)
    work = {i: (rng.randint(3, 12), 40) for i in range(30)}
    ref = _reference_tokens(work, ignore_eos=False, eos_mod=7)
    shares = [len(t) / 40 for t in ref.values()]
    assert min(shares) < 0.5 and all(len(t) <= 40 for t in ref.values())
    sched = _sched(num_blocks=30, block_size=4, max_prefill_tokens=64)
    assert sched.expected_output_share == 1.0  # nothing has finished yet: full length
    seen = []
    fin, steps = _drive(
        sched,
        [_seq(i, p, n, ignore_eos=False) for i, (p, n) in work.items()],
        eos_mod=7,
        on_step=lambda sc, out: seen.append(len(sc.running)),
    )
    assert {i: f.output_token_ids for i, f in fin.items()} == ref
    assert sched.expected_output_share < 0.9  # it learned that sequences stop early
    # At full length (41-52 slots = 11-13 blocks) the 30-block pool holds two sequences; the learned
    # share lets it run more.
    assert max(seen) > 2
    # A preemption pulls the estimate halfway back to full length.
    before = sched.expected_output_share
    seq = _seq(99, 4, 8, ignore_eos=False)
    sched.add(seq)
    sched.update(out := sched.schedule(), FakeModel(4).run(out))
    sched.running.remove(seq)
    sched._preempt(seq)
    assert sched.expected_output_share == pytest.approx(before + 0.5 * (1 - before))


def test_reserve_runs_sequences_that_only_fit_alone_one_at_a_time():
    # Each needs 10 of the 10 blocks at full length: the second waits for the first to finish.
    sched = _sched(num_blocks=10, block_size=4, max_prefill_tokens=100)
    work = {0: (20, 21), 1: (20, 21)}
    fin, steps = _drive(sched, [_seq(i, p, n) for i, (p, n) in work.items()])
    assert sched.num_preemptions == 0
    assert all(len(s.seqs) == 1 for s in steps)
    assert {i: f.output_token_ids for i, f in fin.items()} == _reference_tokens(work)


def test_eos_stops_unless_ignored():
    sched = _sched()
    a = _seq(0, 4, 10, ignore_eos=False)
    b = _seq(1, 4, 10, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    fin = sched.update(out, {0: EOS, 1: EOS})
    assert [s.seq_id for s in fin] == [0] and a.finish_reason == "stop" and a.output_token_ids == [EOS]
    assert b.status is SequenceStatus.RUNNING


def test_rejection_reasons():
    sched = _sched(num_blocks=100, block_size=4, max_model_len=100)
    assert sched.rejection_reason(50, 50) is None
    assert "max_model_len" in sched.rejection_reason(60, 41)
    small = _sched(num_blocks=10, block_size=4, max_model_len=1000)
    assert small.rejection_reason(20, 21) is None  # 40 KV entries = 10 blocks exactly
    assert "whole pool" in small.rejection_reason(20, 22)
    with pytest.raises(ValueError):
        small.add(_seq(0, 20, 22))
    assert not small.has_unfinished()


def test_abort_waiting_and_running_frees_blocks():
    sched = _sched(max_batch_size=1)
    a, b = _seq(0, 4, 5), _seq(1, 4, 5)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [s.seq_id for s in out.seqs] == [0]
    sched.abort(1, error="bad image")
    assert b.finish_reason == "error" and b.error == "bad image" and not sched.waiting
    sched.abort(0)
    assert a.finish_reason == "error" and sched.block_manager.num_free_blocks == 64
    assert sched.update(out, {0: 5}) == []  # results of an aborted step are dropped
    assert not sched.has_unfinished()
    assert sched.abort(0) is None


def test_scheduler_and_block_manager_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, modelyard.engine.scheduler, modelyard.engine.block_manager; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
