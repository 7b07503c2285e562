"""Per-model work sources and the Output -> result-row conversion.

A model's work is the lazy product (inputs x prompts) minus the keys already in the store, plus
units to retry after an actor died. Units that were in flight when an actor died are "suspects":
they are retried one at a time, so an input that kills the actor by itself is identified and
turned into an error row instead of taking the model's restart budget with it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from ..outputs.store import ResultStore, error_row, make_key
from ..spec.inputs import InputItem, iter_items
from ..spec.job import JobSpec, ModelSpec, PromptSpec


@dataclass(slots=True)
class Unit:
    """One (image, prompt) for one model: the store key and how often an actor died holding it."""

    key: str
    item: InputItem
    prompt: PromptSpec
    text: str  # the prompt text this model gets (its override or the job's)
    attempts: int = 0  # actor deaths while this unit was in flight
    request_id: str = ""
    submitted_at: float = 0.0


class ModelWork:
    """The pending units of one model, shared by its replicas (data parallel)."""

    def __init__(self, job: JobSpec, model: ModelSpec, store: ResultStore):
        self.job, self.model, self.store = job, model, store
        self._gen: Iterator[Unit] | None = self._pending()
        self._peeked: Unit | None = None  # read by has_pending(), handed out by the next take()
        self.suspects: deque[Unit] = deque()
        self.in_flight: set[str] = set()

    def _pending(self) -> Iterator[Unit]:
        for item in iter_items(self.job.inputs):
            for p in self.job.prompts:
                key = make_key(item.image_id, self.model.name, p.id)
                if not self.store.is_done(key):
                    yield Unit(key, item, p, self.model.prompt_text(p))

    def _next_new(self) -> Unit | None:
        """The next unit of the inputs that is neither done nor in flight; None once they are read."""
        while self._gen is not None:
            u = next(self._gen, None)
            if u is None:
                self._gen = None
                break
            # a key may repeat in the input (the same path twice): submit it once
            if u.key in self.in_flight or self.store.is_done(u.key):
                continue
            return u
        return None

    def has_pending(self) -> bool:
        """Whether take() will give a unit. Reads the inputs only up to the first pending key and
        keeps that one unit, so a model with work answers at once and a finished one costs a pass
        over its keys, never a list of them."""
        if self.suspects or self._peeked is not None:
            return True
        self._peeked = self._next_new()
        return self._peeked is not None

    def take(self, allow_suspect: bool) -> Unit | None:
        """The next unit to submit, or None. Suspects only when the caller can isolate them."""
        if self.suspects:
            return self.suspects.popleft() if allow_suspect else None
        u = self._peeked if self._peeked is not None else self._next_new()
        self._peeked = None
        if u is not None:
            self.in_flight.add(u.key)
        return u

    def put_back(self, unit: Unit) -> None:
        self.suspects.append(unit)

    def finish(self, unit: Unit) -> None:
        self.in_flight.discard(unit.key)

    @property
    def exhausted(self) -> bool:
        return self._gen is None and self._peeked is None and not self.suspects

    def drain(self) -> Iterator[Unit]:
        """Everything not yet submitted (for error rows when the model cannot run)."""
        while True:
            u = self.take(allow_suspect=True)
            if u is None:
                return
            yield u


def count_pending(job: JobSpec, store: ResultStore) -> tuple[dict[str, int], int]:
    """Units still to do per model, and units per model in all (one pass over the inputs)."""
    counts = {m.name: 0 for m in job.models}
    total = 0
    for item in iter_items(job.inputs):
        total += len(job.prompts)
        for m in job.models:
            for p in job.prompts:
                if not store.is_done(make_key(item.image_id, m.name, p.id)):
                    counts[m.name] += 1
    return counts, total


def output_row(unit: Unit, model: str, out, latency_s: float, worker: str) -> dict:
    """A store row from an engine Output (finish_reason "error" becomes an error row)."""
    src = unit.item.path
    if out.finish_reason == "error":
        return error_row(
            unit.item.image_id,
            model,
            unit.prompt.id,
            out.error or "engine error",
            retryable=False,
            source=src,
            prompt=unit.text,
            attempts=unit.attempts + 1,
            worker=worker,
        )
    return {
        "image_id": unit.item.image_id,
        "model": model,
        "prompt_id": unit.prompt.id,
        "caption": out.text,
        "finish_reason": out.finish_reason,
        "error": None,
        "num_prompt_tokens": int(out.num_prompt_tokens),
        "num_image_tokens": int(out.num_image_tokens),
        "num_generated_tokens": len(out.token_ids),
        "latency_s": float(latency_s),
        "source": src,
        "prompt": unit.text,
        "attempts": unit.attempts + 1,
        "worker": worker,
    }


def failed_row(unit: Unit, model: str, reason: str, *, retryable: bool, worker: str = "") -> dict:
    return error_row(
        unit.item.image_id,
        model,
        unit.prompt.id,
        reason,
        retryable=retryable,
        source=unit.item.path,
        prompt=unit.text,
        attempts=max(unit.attempts, 1),
        worker=worker,
    )
