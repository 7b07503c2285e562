"""Engine: the native paged-KV, continuous-batching VLM engine behind the public API.

    eng = Engine.from_pretrained(path, EngineConfig(...))
    outs = eng.generate([Request(image=..., prompt=...)])       # Outputs in request order
    eng.add_request(req); eng.step() -> finished Outputs; eng.has_unfinished(); eng.stats(); eng.close()

A request is decoded and formatted when it is added (a bad image or an impossible length becomes
an "error" Output at the next step, nothing else is affected); its pixels wait here until the
step that encodes them and are dropped then. A sequence preempted after that is recomputed from
the Request's own image source, so nothing per image outlives its prefill.

On CUDA, generate() decodes and preprocesses its requests on a small thread pool while the engine
steps, admitting them in request order as they become ready, so the host work overlaps the GPU's.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from .images import load_images
from .processor import ProcessedInputs, Processor
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import Sequence
from .types import Output, Request, SamplingParams


_PREP_WORKERS = 2        # PIL decode / resize and torch normalize release the GIL
_PREP_FIRST_BATCH = 8    # requests an idle engine waits for before its first step


@dataclass
class _Entry:
    request: Request
    seq: Sequence
    num_image_tokens: int
    pixel_values: torch.Tensor | None     # host; None once encoded (or for text-only requests)
    has_images: bool


class Engine:
    def __init__(self, *, model, processor: Processor, kv_cache, runner, scheduler: Scheduler,
                 config: EngineConfig, max_model_len: int, weights_bytes: int, kv_sizing: str):
        self.model, self.processor, self.kv_cache, self.runner = model, processor, kv_cache, runner
        self.scheduler = scheduler
        self.config = config
        self.max_model_len = max_model_len
        self.weights_bytes = weights_bytes
        self.kv_sizing = kv_sizing
        self._entries: dict[int, _Entry] = {}
        self._in_flight: set[str] = set()       # request ids of self._entries
        self._ready: list[Output] = []          # finished outside a step (errors at admission)
        self._seq_ids = itertools.count()
        self._num_finished = 0
        self._closed = False
        # Preprocessing threads for generate(): on CUDA the host work would otherwise serialize with
        # the GPU's (512 images x a few ms each is seconds). 0 keeps the CPU path strictly serial.
        self._prep_workers = _PREP_WORKERS if runner.device.type == "cuda" else 0
        self._step_time = {"prefill": 0.0, "decode": 0.0}
        self._step_count = {"prefill": 0, "decode": 0}
        self._step_tokens = {"prefill": 0, "decode": 0}

    @classmethod
    def from_pretrained(cls, path, config: EngineConfig | None = None):
        config = config or EngineConfig()
        if config.backend == "transformers":
            from .hf_engine import HFEngine
            return HFEngine.from_pretrained(path, config)
        return cls(**_build(path, config))

    # ---- public API --------------------------------------------------------------------------

    def add_request(self, req: Request) -> str:
        self._check_open()
        if not isinstance(req, Request):
            raise TypeError(f"add_request takes a Request, got {type(req).__name__}")
        if not isinstance(req.sampling, SamplingParams):
            raise TypeError(f"Request.sampling must be a SamplingParams, got {type(req.sampling).__name__}")
        if req.request_id in self._in_flight:
            raise ValueError(f"request_id {req.request_id!r} is already in flight")
        arrival = time.monotonic()
        return self._admit(req, *self._process_or_error(req), arrival)

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
        self._entries[seq_id] = _Entry(req, seq, processed.num_image_tokens, processed.pixel_values,
                                       has_images=processed.num_images > 0)
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
            raise RuntimeError(f"scheduler made no progress: {len(self.scheduler.waiting)} waiting, "
                               f"{len(self.scheduler.running)} running, "
                               f"{self.scheduler.block_manager.num_free_blocks} free blocks")
        for seq_id in out.preempted:
            self.runner.release(seq_id)
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
                raise RuntimeError("engine idle with requests unfinished")   # a bug, never a hang
            collect(self.step())
        self._ready.extend(others)    # requests added by someone else: returned by their next step()
        return [done[i] for i in ids]

    def _check_batch(self, requests: list[Request]) -> list[str]:
        """add_request's checks for every request up front, so a bad call fails before any work."""
        self._check_open()
        for req in requests:
            if not isinstance(req, Request):
                raise TypeError(f"add_request takes a Request, got {type(req).__name__}")
            if not isinstance(req.sampling, SamplingParams):
                raise TypeError(f"Request.sampling must be a SamplingParams, got {type(req.sampling).__name__}")
            if req.request_id in self._in_flight:
                raise ValueError(f"request_id {req.request_id!r} is already in flight")
        return [r.request_id for r in requests]

    def _add_overlapped(self, requests: list[Request], collect) -> None:
        """add_request for every (checked) request, preprocessing on threads while the engine steps.

        Requests are admitted in their order, so seq ids and derived seeds match serial adds. While
        the next one is not ready the engine steps, unless it is idle: then it waits for a few, so
        the first prefill is not a single image."""
        arrival = time.monotonic()
        with ThreadPoolExecutor(self._prep_workers, thread_name_prefix="modelyard-prep") as pool:
            pending: deque[tuple[Request, Future]] = deque(
                (r, pool.submit(self._process_or_error, r)) for r in requests)
            try:
                while pending:
                    if not pending[0][1].done() and self.has_unfinished():
                        collect(self.step())
                        continue
                    if not self.has_unfinished():   # idle: wait for a first batch, not one image
                        pending[min(len(pending), _PREP_FIRST_BATCH) - 1][1].result()
                    while pending and pending[0][1].done():
                        req, fut = pending.popleft()
                        self._admit(req, *fut.result(), arrival)
            except BaseException:
                for _, fut in pending:     # don't preprocess the rest before the error surfaces
                    fut.cancel()
                raise

    def stats(self) -> dict:
        bm = self.scheduler.block_manager
        return {
            "backend": "native", "device": str(self.runner.device), "dtype": str(self.kv_cache.spec.dtype),
            "kv_blocks_total": bm.num_blocks, "kv_blocks_used": bm.num_used_blocks,
            "block_size": bm.block_size, "kv_bytes": self.kv_cache.nbytes, "kv_sizing": self.kv_sizing,
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions, "weights_bytes": self.weights_bytes,
            "num_requests_finished": self._num_finished, "max_model_len": self.max_model_len,
            "image_features_held": self.runner.num_held_image_features,
            **self.runner.describe(),
            **{f"{phase}_{what}": table[phase] for phase in ("prefill", "decode")
               for what, table in (("steps", self._step_count), ("seconds", self._step_time),
                                   ("tokens", self._step_tokens))},
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
        self._ready.append(Output(
            req.request_id, finish_reason="error", error=error,
            num_prompt_tokens=len(processed.input_ids) if processed else 0,
            num_image_tokens=processed.num_image_tokens if processed else 0, timings=_zero_timings()))
        return req.request_id

    def _process(self, req: Request) -> ProcessedInputs:
        images = load_images(req.image)
        processed = self.processor(req.prompt, images)
        per_image = self.model.num_image_tokens()
        if processed.num_image_tokens != per_image * processed.num_images:
            raise ValueError(f"the processor expanded {processed.num_images} image(s) into "
                             f"{processed.num_image_tokens} placeholder tokens but the model produces "
                             f"{per_image} feature rows per image")
        return processed

    def _encode_new_images(self, out: SchedulerOutput, outputs: list[Output]) -> SchedulerOutput:
        """Encode images of spans starting a prefill; a recompute whose image source went bad fails."""
        batch, failed = [], set()
        for span in out.seqs:
            entry = self._entries[span.seq_id]
            if not (span.is_first_chunk and entry.has_images):
                continue
            pixels, entry.pixel_values = entry.pixel_values, None
            if pixels is None:      # recompute after preemption: re-derive from the request's source
                try:
                    pixels = self._process(entry.request).pixel_values
                except Exception as e:
                    self.scheduler.abort(span.seq_id, error=f"re-reading the image for recompute "
                                                            f"failed: {type(e).__name__}: {e}")
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
            request_id=entry.request.request_id, text=self.processor.decode(tokens) if tokens else "",
            token_ids=tokens, finish_reason=seq.finish_reason, error=seq.error,
            num_prompt_tokens=seq.num_prompt_tokens, num_image_tokens=entry.num_image_tokens,
            timings={"queue": sched - seq.arrival_time, "prefill": first - sched, "decode": end - first,
                     "total": end - seq.arrival_time})


def _build(path, config: EngineConfig) -> dict:
    """Load the model, size and allocate the KV pool, wire the parts. Returns Engine kwargs."""
    from .attention import get_backend
    from .cuda_graphs import decode_graphs_for
    from .kv_cache import KVCache, KVCacheSpec, estimate_activation_bytes, plan_num_blocks
    from .loader import load_model, read_config
    from .runner import ModelRunner

    device = torch.device(config.resolved_device())
    dtype = config.resolved_dtype()
    hf_config = read_config(path)
    max_pos = int(hf_config.text_config.max_position_embeddings)
    max_model_len = config.max_model_len or max_pos
    if max_model_len > max_pos:
        raise ValueError(f"max_model_len {max_model_len} exceeds the checkpoint's max_position_embeddings "
                         f"{max_pos}")
    model = load_model(path, dtype, device, max_model_len)
    weights_bytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(),
                                                                             model.buffers()))
    processor = Processor.from_pretrained(path, image_token_id=model.image_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()      # loader staging buffers must not count as "used" below
    spec = KVCacheSpec(model.num_layers, model.num_kv_heads, model.head_dim, config.block_size, dtype)
    num_blocks, sizing = plan_num_blocks(config, spec, device, weights_bytes,
                                         estimate_activation_bytes(hf_config, config, dtype), max_model_len)
    kv_cache = KVCache(spec, num_blocks, device)
    attn = get_backend(config.attention_backend, device, head_dim=model.head_dim, dtype=dtype)
    graphs, graphs_note = decode_graphs_for(config, model, kv_cache, attn, device, max_model_len)
    runner = ModelRunner(model, kv_cache, attn, device, config.max_image_batch, graphs=graphs,
                         graphs_note=graphs_note)
    scheduler = Scheduler(
        SchedulerConfig(max_batch_size=config.max_batch_size, max_prefill_tokens=config.max_prefill_tokens,
                        max_model_len=max_model_len, eos_token_ids=processor.eos_token_ids),
        BlockManager(num_blocks, config.block_size))
    return dict(model=model, processor=processor, kv_cache=kv_cache, runner=runner, scheduler=scheduler,
                config=config, max_model_len=max_model_len, weights_bytes=weights_bytes, kv_sizing=sizing)


def _zero_timings() -> dict:
    return {"queue": 0.0, "prefill": 0.0, "decode": 0.0, "total": 0.0}
