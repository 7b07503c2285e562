"""Sequence: the scheduler's per-request state. Plain Python, no torch.

A sequence's tokens are its prompt followed by what it has generated so far. The KV cache holds
entries for the first `num_computed_tokens` of them. Each step processes a contiguous span of
uncomputed tokens; a step whose span reaches the last token samples the next one. Prefill is
the span from 0 (or from where a chunk left off) and decode is the one-token span after a sample,
so recompute after preemption is just prefill over prompt + generated tokens.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .types import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds blocks; prefilling or decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0  # resolved per-request seed (SamplingParams.seed or derived)
    arrival_time: float = 0.0

    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # KV entries written for this sequence
    block_table: list[int] = field(default_factory=list)
    prefill_done: bool = False  # True once the current admission has sampled a token
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None

    # Timestamps set by the engine (seconds, monotonic clock); None until they happen.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self):
        if not self.prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def ignore_eos(self) -> bool:
        return self.sampling.ignore_eos

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_total_tokens(self) -> int:
        """Prompt plus every token it may generate: what admission checks against the limits."""
        return self.num_prompt_tokens + self.max_new_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_span(self, start: int, end: int) -> list[int]:
        """Token ids at absolute positions [start, end) of prompt + output."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]
