"""The `transformers` fallback backend: any checkpoint AutoModelForImageTextToText can load runs through
transformers `generate`, behind the same API and Output fields as the native engine, so models without
native code still work everywhere in modelyard (actors, jobs, comparison reports). backend="auto" (the
default) picks it by itself for checkpoints the native engine does not implement (backends.py).

It batches waiting requests that share sampling parameters (left padding), one `generate` per step.
A request whose input the processor rejects, or whose prompt and max_new_tokens exceed the context
(max_model_len, default the checkpoint's max_position_embeddings), becomes that request's error
Output; the rest of its batch runs. There is no paged KV cache: memory is whatever transformers uses
for the batch.
"""

from __future__ import annotations

import copy
import time
from collections import deque

from .config import EngineConfig
from .processor import Processor, read_eos_token_ids
from .types import Output, Request, SamplingParams


def _check_supported(config: EngineConfig, reason: str | None = None) -> None:
    why = f"this checkpoint runs on the transformers backend ({reason}); " if reason else ""
    if config.kv_cache_dtype != "auto":
        raise ValueError(
            f"{why}kv_cache_dtype={config.kv_cache_dtype!r} needs the native engine's paged KV cache; "
            'backend="transformers" keeps its KV cache in the model dtype (use '
            'kv_cache_dtype="auto")'
        )
    if config.quantization is not None:
        raise ValueError(
            f"{why}quantization={config.quantization!r} is the native engine's (its fp8 linear layers); "
            'backend="transformers" runs the checkpoint\'s weights as loaded (use quantization=None)'
        )


def _max_positions(hf_config) -> int | None:
    """The language model's max_position_embeddings, where the config has one."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    value = getattr(text, "max_position_embeddings", None) or getattr(hf_config, "max_position_embeddings", None)
    return int(value) if value else None


def _load(path: str, config: EngineConfig, hf_config):
    """(processor, model) through transformers, with one-line errors for what the user must fix."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .backends import architecture, missing_package
    from .loader import RemoteCodeRequired

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=config.resolved_dtype(), trust_remote_code=False, attn_implementation="sdpa"
        )
    except ImportError as e:
        err = missing_package(e, f"{architecture(hf_config)} (through transformers)")
        if err is e:
            raise
        raise err from e
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        # a processor or tokenizer of the checkpoint's own (auto_map in its configs)
        raise RemoteCodeRequired(
            f"{path}: the checkpoint's processor needs remote code; modelyard loads with "
            "trust_remote_code=False and never runs a checkpoint's own code"
        ) from e
    return processor, model


class HFEngine:
    def __init__(
        self,
        model,
        processor,
        config: EngineConfig,
        path: str,
        load_seconds: float = 0.0,
        backend_reason: str | None = None,
    ):
        import torch

        _check_supported(config, backend_reason)
        self.model, self.processor, self.config, self.path = model, processor, config, path
        self.load_seconds = load_seconds
        self.backend_reason = backend_reason  # why backend="auto" did not take the native engine
        self.device = torch.device(config.resolved_device())
        max_pos = _max_positions(model.config)
        if config.max_model_len and max_pos and config.max_model_len > max_pos:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the checkpoint's max_position_embeddings {max_pos}"
            )
        # None only for a config without max_position_embeddings: then no limit is known here.
        self.max_model_len = config.max_model_len or max_pos
        self._waiting: deque[tuple[Request, float]] = deque()
        self._solo: set[str] = set()  # request ids whose inputs process alone but not in their batch
        self._finished = 0
        tok = processor.tokenizer
        # The native engine's prompt formatting and stop tokens, so both backends format alike.
        self._prompts = Processor(processor, int(model.config.image_token_id), read_eos_token_ids(path, tok))
        self._eos = self._prompts.eos_token_ids
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self._eos), 0)
        self._weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    @classmethod
    def from_pretrained(cls, path, config: EngineConfig | None = None, reason: str | None = None) -> HFEngine:
        """reason: why backend="auto" chose this backend (None when the user asked for it)."""
        from .backends import check_transformers_loadable
        from .loader import read_config

        config = config or EngineConfig(backend="transformers")
        _check_supported(config, reason)  # before loading any weights
        if config.max_batch_size is None:  # generate() pads each group: 64 is transformers' sweet spot
            config = config.replace(max_batch_size=64)
        path = str(path)
        hf_config = read_config(path)  # refuses remote code in one line
        check_transformers_loadable(hf_config)
        t0 = time.perf_counter()
        processor, model = _load(path, config, hf_config)
        processor.tokenizer.padding_side = "left"
        model.to(config.resolved_device()).eval()
        return cls(model, processor, config, path, load_seconds=time.perf_counter() - t0, backend_reason=reason)

    # --- the engine API -------------------------------------------------------------------------
    def add_request(self, req: Request) -> str:
        self._waiting.append((req, time.perf_counter()))
        return req.request_id

    def has_unfinished(self) -> bool:
        return bool(self._waiting)

    def step(self) -> list[Output]:
        """Run one `generate` over the next group of waiting requests with equal sampling params."""
        if not self._waiting:
            return []
        head = self._waiting[0][0]
        if head.request_id in self._solo:  # its batch failed as a whole: it runs alone
            self._solo.discard(head.request_id)
            outs = self._run_group([self._waiting.popleft()])
            self._finished += len(outs)
            return outs
        group, rest = [], deque()
        while self._waiting:
            item = self._waiting.popleft()
            same = item[0].sampling == head.sampling and (head.sampling.seed is None or not group)
            (group if same and len(group) < self.config.max_batch_size else rest).append(item)
        self._waiting = rest
        outs = self._run_group(group)
        self._finished += len(outs)
        return outs

    def generate(self, requests: list[Request]) -> list[Output]:
        ids = [self.add_request(r) for r in requests]
        done: dict[str, Output] = {}
        while self.has_unfinished():
            for o in self.step():
                done[o.request_id] = o
        return [done[i] for i in ids]

    def stats(self) -> dict:
        return {
            "backend": "transformers",
            "kv_blocks_total": 0,
            "kv_blocks_used": 0,
            "running": 0,
            "waiting": len(self._waiting),
            "preemptions": 0,
            "weights_bytes": self._weights_bytes,
            "kv_bytes": 0,
            "num_requests_finished": self._finished,
            "device": str(self.device),
            # no pool to preallocate: transformers grows its cache per generate() call
            "load_seconds": self.load_seconds,
            "kv_alloc_seconds": 0.0,
            "max_batch_size": self.config.max_batch_size,
            "max_model_len": self.max_model_len,
            "backend_reason": self.backend_reason,
        }

    def close(self) -> None:
        import gc

        self.model = None
        gc.collect()

    # --- internals -------------------------------------------------------------------------------
    def _run_group(self, group) -> list[Output]:
        import torch

        from .images import load_images

        outs: list[Output] = []
        items = []  # (request, arrival, formatted prompt, images)
        for req, t_arrive in group:
            try:
                imgs = load_images(req.image)
                items.append((req, t_arrive, self._prompts.format_prompt(req.prompt, len(imgs)), imgs))
            except Exception as e:  # one bad request is one error Output; the rest go on
                outs.append(_error(req, e))
        if not items:
            return outs
        sp: SamplingParams = items[0][0].sampling
        t0 = time.perf_counter()
        batch, items = self._batch(items, sp, outs)
        if not items:
            return outs
        batch = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}
        pixels = batch.get("pixel_values")
        if pixels is not None and pixels.is_floating_point():
            batch["pixel_values"] = pixels.to(self.model.dtype)
        prompt_lens = _prompt_lengths(batch)
        n_img = (batch["input_ids"] == self.model.config.image_token_id).sum(-1).tolist()
        gen = copy.deepcopy(self.model.generation_config)
        gen.update(max_new_tokens=sp.max_new_tokens, pad_token_id=self._pad_id)
        if sp.ignore_eos:
            # ignore_eos means what it means natively: EOS is an ordinary token that may be generated,
            # and generation goes on to max_new_tokens (min_new_tokens would suppress it instead)
            gen.eos_token_id = []  # None would be filled back in from the model's defaults
        if sp.temperature > 0:
            gen.update(do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k or None)
            torch.manual_seed(sp.seed if sp.seed is not None else self.config.seed)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            seqs = self.model.generate(**batch, generation_config=gen)
        t1 = time.perf_counter()
        new = seqs[:, batch["input_ids"].shape[1] :].tolist()
        for (req, t_arrive, _, _), toks, plen, ni in zip(items, new, prompt_lens, n_img):
            reason = "length"
            if not sp.ignore_eos:
                for j, t in enumerate(toks):
                    if t in self._eos:
                        toks, reason = toks[: j + 1], "stop"
                        break
            toks = toks[: sp.max_new_tokens]
            text = self.processor.tokenizer.decode(toks, skip_special_tokens=True)
            outs.append(
                Output(
                    req.request_id,
                    text=text,
                    token_ids=toks,
                    finish_reason=reason,
                    num_prompt_tokens=plen,
                    num_image_tokens=ni,
                    timings={"queue": t0 - t_arrive, "prefill": 0.0, "decode": t1 - t0, "total": t1 - t_arrive},
                )
            )
        return outs

    def _process(self, items) -> dict:
        return self.processor(
            images=[it[3] for it in items], text=[it[2] for it in items], return_tensors="pt", padding=True
        )

    def _batch(self, items: list, sp: SamplingParams, outs: list[Output]) -> tuple[dict | None, list]:
        """The processor's batch for the requests that can run, and those requests; the others
        (an input the processor rejects, a prompt too long for the context) become error Outputs."""
        try:
            batch = self._process(items)
            lengths: list = _prompt_lengths(batch)
        except Exception:  # some request's input broke the batch: process each alone to find it
            batch, lengths = None, []
            for it in items:
                try:
                    lengths.append(_prompt_lengths(self._process([it]))[0])
                except Exception as e:
                    lengths.append(e)
        keep = []
        for it, n in zip(items, lengths):
            if isinstance(n, Exception):
                outs.append(_error(it[0], n))
            elif self.max_model_len and n + sp.max_new_tokens > self.max_model_len:
                outs.append(
                    Output(
                        it[0].request_id,
                        finish_reason="error",
                        num_prompt_tokens=n,
                        error=f"prompt ({n} tokens) + max_new_tokens ({sp.max_new_tokens}) = "
                        f"{n + sp.max_new_tokens} exceeds max_model_len ({self.max_model_len})",
                    )
                )
            else:
                keep.append(it)
        if keep and (batch is None or len(keep) < len(items)):
            try:
                batch = self._process(keep)
            except Exception:  # each input is fine alone, only their batch is not: one at a time
                if len(keep) == 1:
                    raise
                self._solo.update(it[0].request_id for it in keep[1:])
                self._waiting.extendleft(reversed([(it[0], it[1]) for it in keep[1:]]))
                keep = keep[:1]
                batch = self._process(keep)
        return batch, keep


def _error(req: Request, e: Exception) -> Output:
    return Output(req.request_id, finish_reason="error", error=f"{type(e).__name__}: {e}")


def _prompt_lengths(batch) -> list[int]:
    """Tokens of each prompt in a left-padded batch."""
    mask = batch.get("attention_mask")
    if mask is None:
        return [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
    return [int(n) for n in mask.sum(-1).tolist()]
