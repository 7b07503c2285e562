"""Scheduler: continuous batching over a fixed block pool. Plain Python, no torch.

Prefill has priority (a step is either prefill chunks or decodes, never both): sequences whose
prefill was chunked continue first, then waiting sequences are admitted first-come-first-served
while the prefill token budget, `max_batch_size` and the free blocks allow. A sequence gets blocks
for all of its current tokens when admitted, so its later chunks never wait for memory. A decode
step gives each running sequence one token; when one needs a block and none is free, the most
recently admitted sequence is preempted (blocks freed, put back at the head of the queue) and
later recomputed from its prompt plus the tokens it had already generated.

Admission also keeps blocks back for the decode growth of everything admitted
(`reserve_decode_blocks`), so a pool too small for the whole batch at full length runs fewer
sequences at once instead of admitting them all and recomputing the ones preempted later. A
sequence that ignores EOS grows to exactly its max_new_tokens; one that can stop is expected to
end at the share of max_new_tokens that finished sequences used (`expected_output_share`, 1 until
the first ones finish), never before its next token. A preemption shows that the estimate was
short and moves it halfway back to 1. Preemption stays the fallback for what an estimate misses.
One exception to the reserve: a sequence a little short of it (a quarter of the running ones'
reserved growth at most) is admitted when, were the queue to run in rounds of that size, that
saves a round; the pool then runs out only near the round's end, and one preemption there costs
less than a round of decode steps for the few sequences left over.

The runner receives a `SchedulerOutput` of plain values (copies of token spans and block tables),
so nothing the scheduler mutates afterwards can change a step that is already running.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus
from .types import SamplingParams


@dataclass(frozen=True)
class ScheduledSeq:
    seq_id: int
    token_ids: tuple[int, ...]  # tokens at positions [start_pos, start_pos + len)
    start_pos: int  # KV entries already cached for this sequence
    num_prompt_tokens: int  # only prompt positions may hold image placeholders
    block_table: tuple[int, ...]  # covers at least start_pos + len(token_ids) slots
    sample: bool  # the span reaches the sequence's last token: sample the next
    sampling: SamplingParams = SamplingParams()
    seed: int = 0

    @property
    def output_index(self) -> int:
        """Which new token of its request a sampling span draws (0 = the first)."""
        return self.seq_len - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def is_first_chunk(self) -> bool:
        """The first span since (re)admission: the sequence's images must be encoded now."""
        return self.start_pos == 0


@dataclass(frozen=True)
class SchedulerOutput:
    is_prefill: bool
    seqs: tuple[ScheduledSeq, ...] = ()
    preempted: tuple[int, ...] = ()  # seq ids preempted while building this step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int
    max_prefill_tokens: int
    max_model_len: int
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    reserve_decode_blocks: bool = True  # admit only what the pool can also grow to its expected lengths

    def __post_init__(self):
        for name in ("max_batch_size", "max_prefill_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self._seqs: dict[int, Sequence] = {}
        self.num_preemptions = 0
        # Expected final output length of a sequence that can stop at EOS, as a share of its
        # max_new_tokens: a running mean of finished sequences' shares with a prior of one share of
        # 1.0, then an exponential average over about the last 64 (see _record_finish).
        self.expected_output_share = 1.0
        self._num_shares = 0

    # ---- admission ---------------------------------------------------------------------------

    def rejection_reason(self, num_prompt_tokens: int, max_new_tokens: int) -> str | None:
        """Why a request of this size can never run, or None if it can."""
        total = num_prompt_tokens + max_new_tokens
        if total > self.config.max_model_len:
            return (
                f"prompt ({num_prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                f"exceeds max_model_len ({self.config.max_model_len})"
            )
        # The last sampled token is never fed back, so a sequence holds at most total - 1 KV entries.
        needed = self.block_manager.blocks_for(total - 1)
        if needed > self.block_manager.num_blocks:
            return (
                f"prompt ({num_prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) needs "
                f"{needed} KV blocks but the whole pool has {self.block_manager.num_blocks} "
                f"(block_size {self.block_manager.block_size})"
            )
        return None

    def add(self, seq: Sequence) -> None:
        reason = self.rejection_reason(seq.num_prompt_tokens, seq.max_new_tokens)
        if reason is not None:
            raise ValueError(reason)
        if seq.seq_id in self._seqs:
            raise ValueError(f"seq {seq.seq_id} already scheduled")
        seq.status = SequenceStatus.WAITING
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = self._schedule_prefill()
        if not out.is_empty:
            return out
        return self._schedule_decode()

    def _schedule_prefill(self) -> SchedulerOutput:
        budget = self.config.max_prefill_tokens
        spans: list[ScheduledSeq] = []
        for seq in self.running:
            if budget == 0:
                break
            if not seq.prefill_done:
                n = min(seq.num_uncomputed_tokens, budget)
                spans.append(self._span(seq, n))
                budget -= n
        bm = self.block_manager
        reserve = self.config.reserve_decode_blocks
        growth = None  # blocks the running sequences are still expected to take; summed on first need
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.config.max_batch_size
            and bm.can_allocate(self.waiting[0], self.waiting[0].num_tokens)
        ):
            # With nothing running the sequence fits the pool alone (rejection_reason): admit it.
            if reserve and self.running:
                if growth is None:
                    growth = sum(self._blocks_to_come(s) for s in self.running)
                short = self._blocks_to_come(self.waiting[0]) + growth - bm.num_free_blocks
                if short > 0 and not self._one_more_saves_a_round(short, growth):
                    break
            seq = self.waiting.popleft()
            bm.allocate(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens, budget)
            spans.append(self._span(seq, n))
            budget -= n
            if growth is not None:
                growth += self._blocks_to_come(seq)
        return SchedulerOutput(is_prefill=True, seqs=tuple(spans))

    def _one_more_saves_a_round(self, short: int, growth: int) -> bool:
        """Admit one more sequence although the reserve is `short` blocks short, if the queue, run
        in rounds of the running sequences' size, would then need one round fewer, and `short` is
        at most a quarter of the growth still reserved for the running sequences: the pool then runs
        out in the last quarter of their decode, where one preemption (recomputing one sequence)
        costs less than the extra round of decode steps the few left-over sequences would take."""
        if 4 * short > growth:
            return False
        n, total = len(self.running), len(self.running) + len(self.waiting)
        return -(-total // (n + 1)) < -(-total // n)

    def _blocks_to_come(self, seq: Sequence) -> int:
        """Blocks `seq` is expected to take beyond those it holds, to its expected final length."""
        done, most = seq.num_output_tokens, seq.max_new_tokens
        if seq.ignore_eos:
            final = most
        else:
            final = min(most, max(done + 1, math.ceil(self.expected_output_share * most)))
        # The last sampled token is never fed back, so a sequence ends holding prompt + final - 1 entries.
        needed = self.block_manager.blocks_for(seq.num_prompt_tokens + final - 1)
        return max(0, needed - len(seq.block_table))

    def _record_finish(self, seq: Sequence) -> None:
        if seq.ignore_eos:
            return  # its length was never in doubt, and says nothing about the others'
        self._num_shares += 1
        weight = 1.0 / min(self._num_shares + 1, 64)
        share = seq.num_output_tokens / seq.max_new_tokens
        self.expected_output_share += weight * (share - self.expected_output_share)

    def _schedule_decode(self) -> SchedulerOutput:
        bm = self.block_manager
        spans: list[ScheduledSeq] = []
        preempted: list[int] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            assert seq.prefill_done and seq.num_uncomputed_tokens == 1, "decode of an unprefilled seq"
            while not bm.can_allocate(seq, seq.num_tokens) and self.running[-1] is not seq:
                preempted.append(self._preempt(self.running.pop()))
            if not bm.can_allocate(seq, seq.num_tokens):
                # Only this (the most recent) sequence is left to give blocks back.
                preempted.append(self._preempt(self.running.pop()))
                break
            bm.allocate(seq, seq.num_tokens)
            spans.append(self._span(seq, 1))
            i += 1
        return SchedulerOutput(is_prefill=False, seqs=tuple(spans), preempted=tuple(preempted))

    def _span(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.token_span(start, start + n)),
            start_pos=start,
            num_prompt_tokens=seq.num_prompt_tokens,
            block_table=tuple(seq.block_table),
            sample=start + n == seq.num_tokens,
            sampling=seq.sampling,
            seed=seq.seed,
        )

    def _preempt(self, seq: Sequence) -> int:
        # Sequences outgrew the estimate the admissions were made on: lean back towards full length.
        self.expected_output_share += 0.5 * (1.0 - self.expected_output_share)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.prefill_done = False
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # victims are popped newest first, so the oldest ends up first
        return seq.seq_id

    # ---- results -----------------------------------------------------------------------------

    def update(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Record a finished step: advance computed tokens, append sampled ones, detect stops.

        `sampled` maps seq_id -> token for every span with `sample` set. Returns the sequences
        that finished; their blocks are already free.
        """
        finished = []
        for span in out.seqs:
            seq = self._seqs.get(span.seq_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens = span.seq_len
            if not span.sample:
                continue
            token = sampled[span.seq_id]
            seq.output_token_ids.append(token)
            seq.prefill_done = True
            if not seq.ignore_eos and token in self.config.eos_token_ids:
                self._finish(seq, "stop")
            elif seq.num_output_tokens >= seq.max_new_tokens:
                self._finish(seq, "length")
            else:
                continue
            self._record_finish(seq)
            finished.append(seq)
        return finished

    def abort(self, seq_id: int, reason: str = "error", error: str | None = None) -> Sequence | None:
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._finish(seq, reason, error)
        return seq

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        del self._seqs[seq.seq_id]
