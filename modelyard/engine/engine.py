"""Engine: the native paged-KV, continuous-batching VLM engine behind the public API.

    eng = Engine.from_pretrained(path, EngineConfig(...))
    outs = eng.generate([Request(image=..., prompt=...)])       # Outputs in request order
    eng.add_request(req); eng.step() -> finished Outputs; eng.has_unfinished(); eng.stats(); eng.close()

A request is decoded and formatted when it is added (a bad image or an impossible length becomes
an "error" Output at the next step, nothing else is affected); its pixels wait here until the
step that encodes them and are dropped then. A sequence preempted after that is recomputed from
the Request's own image source, so nothing per image outlives its prefill.

On CUDA, generate() decodes and preprocesses its requests on a small thread pool while the engine
steps, admitting them in request order as they become ready, so the host work overlaps the GPU's
(prefetch.py). Construction (weights, KV pool, wiring) is in build.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import torch

from .backends import choose_backend
from .build import build_engine_parts
from .config import EngineConfig
from .images import load_images
from .prefetch import admit_overlapped
from .processor import ProcessedInputs, Processor
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence
from .types import Output, Request, SamplingParams

_PREP_WORKERS = 2  # PIL decode / resize and torch normalize release the GIL
_PREP_FIRST_BATCH = 8  # requests an idle engine waits for before its first step
_PREP_LOOKAHEAD = 128  # requests preprocessed ahead of admission: bounds the pinned pixels held


@dataclass
class _Entry:
    request: Request
    seq: Sequence
    num_image_tokens: int
    pixel_values: torch.Tensor | None  # host, model dtype (pinned on CUDA); None once encoded or text-only
    has_images: bool


class Engine:
    def __init__(
        self,
        *,
        model,
        processor: Processor,
        kv_cache,
        runner,
        scheduler: Scheduler,
        config: EngineConfig,
        max_model_len: int,
        weights_bytes: int,
        kv_sizing: str,
        load_seconds: float,
        kv_alloc_seconds: float,
    ):
        self.model, self.processor, self.kv_cache, self.runner = model, processor, kv_cache, runner
        self.scheduler = scheduler
        self.config = config
        self.max_model_len = max_model_len
        self.weights_bytes = weights_bytes
        self.kv_sizing = kv_sizing
        self.load_seconds, self.kv_alloc_seconds = load_seconds, kv_alloc_seconds
        self._entries: dict[int, _Entry] = {}
        self._in_flight: set[str] = set()  # request ids of self._entries
        self._ready: list[Output] = []  # finished outside a step (errors at admission)
        self._seq_ids = itertools.count()
        self._num_finished = 0
        self._closed = False
        # Preprocessing threads for generate(): on CUDA the host work would otherwise serialize with
        # the GPU's (512 images x a few ms each is seconds). 0 keeps the CPU path strictly serial.
        self._prep_workers = _PREP_WORKERS if runner.device.type == "cuda" else 0
        self._pixel_dtype = config.resolved_dtype()
        self._pin_pixels = runner.device.type == "cuda"
        self._max_running = 0  # the most sequences one step ran: did the engine get a full batch?
        self._step_time = {"prefill": 0.0, "decode": 0.0}
        self._step_count = {"prefill": 0, "decode": 0}
        self._step_tokens = {"prefill": 0, "decode": 0}

    @classmethod
    def from_pretrained(cls, path, config: EngineConfig | None = None):
        """The engine for the checkpoint at `path`: native or the transformers fallback, as
        config.backend asks ("auto": native where it implements the checkpoint; backends.py)."""
        config = config or EngineConfig()
        backend, reason = choose_backend(path, config)
        if backend == "transformers":
            from .hf_engine import HFEngine

            return HFEngine.from_pretrained(path, config.replace(backend="transformers"), reason=reason)
        return cls(**build_engine_parts(path, config.replace(backend="native")))

    # ---- public API --------------------------------------------------------------------------

    def add_request(self, req: Request) -> str:
        self._check_open()
        self._check_request(req)
        arrival = time.monotonic()
        return self._admit(req, *self._process_or_error(req), arrival)

    def prepare(self, req: Request) -> tuple:
        """Decode and preprocess a request's inputs. Thread-safe, so a host (the model actor) runs it
        on a pool, ahead of admission, while the engine steps; a bad input becomes that request's
        error when admitted. Pass the result to add_prepared() on the engine's own thread."""
        return self._process_or_error(req)

    def add_prepared(self, req: Request, prepared: tuple) -> str:
        """add_request() for a request whose inputs prepare() already processed."""
        self._check_open()
        self._check_request(req)
        return self._admit(req, *prepared, time.monotonic())

    def _process_or_error(self, req: Request) -> tuple[ProcessedInputs | None, str | None]:
        """Thread-safe: touches only the request and the (read-only) processor."""
        try:
            return self._process(req), None
        except Exception as e:  # any problem with this request's input fails this request only
            return None, f"{type(e).__name__}: {e}"

    def _admit(self, req: Request, processed: ProcessedInputs | None, error: str | None, arrival: float) -> str:
        seq_id = next(self._seq_ids)
        if processed is None:
            return self._reject(req, error)
        reason = self.scheduler.rejection_reason(len(processed.input_ids), req.sampling.max_new_tokens)
        if reason is not None:
            return self._reject(req, reason, processed)
        seed = req.sampling.seed if req.sampling.seed is not None else self.config.seed + seq_id
        seq = Sequence(seq_id, processed.input_ids, sampling=req.sampling, seed=seed, arrival_time=arrival)
        self._entries[seq_id] = _Entry(
            req, seq, processed.num_image_tokens, processed.pixel_values, has_images=processed.num_images > 0
        )
        self._in_flight.add(req.request_id)
        self.scheduler.add(seq)
        return req.request_id

    def has_unfinished(self) -> bool:
        return bool(self._ready) or self.scheduler.has_unfinished()

    def step(self) -> list[Output]:
        """Run one scheduled step; returns the Outputs of requests that finished in it."""
        self._check_open()
        outputs, self._ready = self._ready, []
        if self.scheduler.has_unfinished():
            self._run_step(outputs)
        return outputs

    def _run_step(self, outputs: list[Output]) -> None:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if out.is_empty and not out.preempted:
            # Admission checks make this impossible; fail loudly rather than spin in generate().
            raise RuntimeError(
                f"scheduler made no progress: {len(self.scheduler.waiting)} waiting, "
                f"{len(self.scheduler.running)} running, "
                f"{self.scheduler.block_manager.num_free_blocks} free blocks"
            )
        for seq_id in out.preempted:
            self.runner.release(seq_id)
        self._max_running = max(self._max_running, len(self.scheduler.running))
        now = time.monotonic()
        out = self._encode_new_images(out, outputs)
        for span in out.seqs:
            seq = self._entries[span.seq_id].seq
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        sampled = self.runner.execute(out)
        phase = "prefill" if out.is_prefill else "decode"
        self._step_time[phase] += time.perf_counter() - t0
        self._step_count[phase] += 1
        self._step_tokens[phase] += out.num_tokens
        finished = self.scheduler.update(out, sampled)
        now = time.monotonic()
        for seq_id in sampled:
            seq = self._entries[seq_id].seq
            if seq.first_token_time is None:
                seq.first_token_time = now
        for seq in finished:
            seq.finish_time = now
            outputs.append(self._finish(seq))

    def generate(self, requests: list[Request]) -> list[Output]:
        overlapped = self._prep_workers > 0 and len(requests) > 1
        ids = self._check_batch(requests) if overlapped else [self.add_request(r) for r in requests]
        wanted = set(ids)
        if len(wanted) != len(ids):
            raise ValueError("duplicate request_id in generate()")
        done: dict[str, Output] = {}
        others: list[Output] = []

        def collect(outs: list[Output]) -> None:
            for o in outs:
                (done.__setitem__(o.request_id, o) if o.request_id in wanted else others.append(o))

        if overlapped:
            self._add_overlapped(requests, collect)
        while len(done) < len(wanted):
            if not self.has_unfinished():
                raise RuntimeError("engine idle with requests unfinished")  # a bug, never a hang
            collect(self.step())
        self._ready.extend(others)  # requests added by someone else: returned by their next step()
        return [done[i] for i in ids]

    def _check_request(self, req: Request) -> None:
        if not isinstance(req, Request):
            raise TypeError(f"add_request takes a Request, got {type(req).__name__}")
        if not isinstance(req.sampling, SamplingParams):
            raise TypeError(f"Request.sampling must be a SamplingParams, got {type(req.sampling).__name__}")
        if req.request_id in self._in_flight:
            raise ValueError(f"request_id {req.request_id!r} is already in flight")

    def _check_batch(self, requests: list[Request]) -> list[str]:
        """add_request's checks for every request up front, so a bad call fails before any work."""
        self._check_open()
        for req in requests:
            self._check_request(req)
        return [r.request_id for r in requests]

    def _add_overlapped(self, requests: list[Request], collect) -> None:
        """add_request for every (checked) request, preprocessing on threads while the engine steps."""
        arrival = time.monotonic()
        admit_overlapped(
            requests,
            prepare=self._process_or_error,
            admit=lambda req, processed, error: self._admit(req, processed, error, arrival),
            step=self.step,
            has_unfinished=self.has_unfinished,
            collect=collect,
            workers=self._prep_workers,
            first_batch=_PREP_FIRST_BATCH,
            lookahead=_PREP_LOOKAHEAD,
        )

    def stats(self) -> dict:
        bm = self.scheduler.block_manager
        return {
            "backend": "native",
            "device": str(self.runner.device),
            "dtype": str(self.config.resolved_dtype()),
            # the pool's element type ("float8_e4m3fn" for an fp8 cache) and its fixed scales
            "kv_cache_dtype": str(self.kv_cache.spec.dtype).removeprefix("torch."),
            "kv_cache_scales": [self.config.kv_cache_k_scale, self.config.kv_cache_v_scale],
            "quantization": self.config.quantization or "none",
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "block_size": bm.block_size,
            "kv_bytes": self.kv_cache.nbytes,
            "kv_sizing": self.kv_sizing,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "max_batch_size": self.config.max_batch_size,
            "max_running_seen": self._max_running,
            "preemptions": self.scheduler.num_preemptions,
            "weights_bytes": self.weights_bytes,
            "load_seconds": self.load_seconds,
            "kv_alloc_seconds": self.kv_alloc_seconds,
            "num_requests_finished": self._num_finished,
            "max_model_len": self.max_model_len,
            "image_features_held": self.runner.num_held_image_features,
            **self.runner.describe(),
            **{
                f"{phase}_{what}": table[phase]
                for phase in ("prefill", "decode")
                for what, table in (
                    ("steps", self._step_count),
                    ("seconds", self._step_time),
                    ("tokens", self._step_tokens),
                )
            },
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        device = self.runner.device
        self._entries.clear()
        self._in_flight.clear()
        self.model = self.kv_cache = self.runner = None
        import gc

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("engine is closed")

    def _reject(self, req: Request, error: str, processed: ProcessedInputs | None = None) -> str:
        """Finish a request that never runs; its error Output comes out of the next step()."""
        self._num_finished += 1
        self._ready.append(
            Output(
                req.request_id,
                finish_reason="error",
                error=error,
                num_prompt_tokens=len(processed.input_ids) if processed else 0,
                num_image_tokens=processed.num_image_tokens if processed else 0,
                timings=_zero_timings(),
            )
        )
        return req.request_id

    def _process(self, req: Request) -> ProcessedInputs:
        images = load_images(req.image, self.processor.min_image_size)
        processed = self.processor(req.prompt, images)
        per_image = self.model.num_image_tokens()
        if processed.num_image_tokens != per_image * processed.num_images:
            raise ValueError(
                f"the processor expanded {processed.num_images} image(s) into "
                f"{processed.num_image_tokens} placeholder tokens but the model produces "
                f"{per_image} feature rows per image"
            )
        if processed.pixel_values is not None:
            # The vision tower casts its input to the model dtype first, so casting here (same
            # rounding) changes nothing but halves the bytes held and copied; on CUDA the pixels go
            # to pinned memory, here on the preprocessing thread, so the step that encodes them
            # issues asynchronous copies instead of stacking and copying pageable memory while the
            # GPU waits (about 15 ms per 16k-token prefill step, measured on an H200).
            src = processed.pixel_values  # [n, 3, H, W] float32
            pixels = torch.empty(src.shape, dtype=self._pixel_dtype, pin_memory=self._pin_pixels)
            pixels.copy_(src)  # cast and pin in one copy
            processed = dataclasses.replace(processed, pixel_values=pixels)
        return processed

    def _encode_new_images(self, out: SchedulerOutput, outputs: list[Output]) -> SchedulerOutput:
        """Encode images of spans starting a prefill; a recompute whose image source went bad fails."""
        batch, failed = [], set()
        for span in out.seqs:
            entry = self._entries[span.seq_id]
            if not (span.is_first_chunk and entry.has_images):
                continue
            pixels, entry.pixel_values = entry.pixel_values, None
            if pixels is None:  # recompute after preemption: re-derive from the request's source
                try:
                    pixels = self._process(entry.request).pixel_values
                except Exception as e:
                    self.scheduler.abort(
                        span.seq_id, error=f"re-reading the image for recompute failed: {type(e).__name__}: {e}"
                    )
                    outputs.append(self._finish(entry.seq))
                    failed.add(span.seq_id)
                    continue
            batch.append((span.seq_id, pixels))
        self.runner.encode_images(batch)
        del batch
        if not failed:
            return out
        return dataclasses.replace(out, seqs=tuple(s for s in out.seqs if s.seq_id not in failed))

    def _finish(self, seq: Sequence) -> Output:
        entry = self._entries.pop(seq.seq_id)
        self._in_flight.discard(entry.request.request_id)
        self.runner.release(seq.seq_id)
        self._num_finished += 1
        end = seq.finish_time or time.monotonic()
        sched = seq.first_scheduled_time or end
        first = seq.first_token_time or end
        tokens = list(seq.output_token_ids)
        return Output(
            request_id=entry.request.request_id,
            text=self.processor.decode(tokens) if tokens else "",
            token_ids=tokens,
            finish_reason=seq.finish_reason,
            error=seq.error,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_image_tokens=entry.num_image_tokens,
            timings={
                "queue": sched - seq.arrival_time,
                "prefill": first - sched,
                "decode": end - first,
                "total": end - seq.arrival_time,
            },
        )


def _zero_timings() -> dict:
    return {"queue": 0.0, "prefill": 0.0, "decode": 0.0, "total": 0.0}
