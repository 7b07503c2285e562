"""The `transformers` fallback backend: any checkpoint AutoModelForImageTextToText can load runs through
transformers `generate`, behind the same API and Output fields as the native engine, so models without
native code still work everywhere in modelyard (actors, jobs, comparison reports).

It batches waiting requests that share sampling parameters (left padding), one `generate` per step.
There is no paged KV cache here: memory is whatever transformers uses for the batch.
"""

from __future__ import annotations

import time
from collections import deque

from .config import EngineConfig
from .processor import Processor, read_eos_token_ids
from .types import Output, Request, SamplingParams


def _check_supported(config: EngineConfig) -> None:
    if config.kv_cache_dtype != "auto":
        raise ValueError(
            f"kv_cache_dtype={config.kv_cache_dtype!r} needs the native engine's paged KV cache; "
            'backend="transformers" keeps its KV cache in the model dtype (use '
            'kv_cache_dtype="auto")'
        )
    if config.quantization is not None:
        raise ValueError(
            f"quantization={config.quantization!r} is the native engine's (its fp8 linear layers); "
            'backend="transformers" runs the checkpoint\'s weights as loaded (use quantization=None)'
        )


class HFEngine:
    def __init__(self, model, processor, config: EngineConfig, path: str, load_seconds: float = 0.0):
        import torch

        _check_supported(config)
        self.model, self.processor, self.config, self.path = model, processor, config, path
        self.load_seconds = load_seconds
        self.device = torch.device(config.resolved_device())
        self._waiting: deque[tuple[Request, float]] = deque()
        self._finished = 0
        tok = processor.tokenizer
        # The native engine's prompt formatting and stop tokens, so both backends format alike.
        self._prompts = Processor(processor, int(model.config.image_token_id), read_eos_token_ids(path, tok))
        self._eos = self._prompts.eos_token_ids
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self._eos), 0)
        self._weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    @classmethod
    def from_pretrained(cls, path, config: EngineConfig | None = None) -> HFEngine:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        config = config or EngineConfig(backend="transformers")
        _check_supported(config)  # before loading any weights
        if config.max_batch_size is None:  # generate() pads each group: 64 is transformers' sweet spot
            config = config.replace(max_batch_size=64)
        path = str(path)
        dtype = config.resolved_dtype()
        t0 = time.perf_counter()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, trust_remote_code=False, attn_implementation="sdpa"
        )
        model.to(config.resolved_device()).eval()
        return cls(model, processor, config, path, load_seconds=time.perf_counter() - t0)

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
        first = self._waiting[0][0].sampling
        group, rest = [], deque()
        while self._waiting:
            item = self._waiting.popleft()
            same = item[0].sampling == first and (first.seed is None or not group)
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
        ok, texts, images = [], [], []
        max_len = self.config.max_model_len
        for req, t_arrive in group:
            try:
                imgs = load_images(req.image)
                text = self._prompts.format_prompt(req.prompt, len(imgs))
            except Exception as e:  # one bad request is one error Output; the rest go on
                outs.append(Output(req.request_id, finish_reason="error", error=f"{type(e).__name__}: {e}"))
                continue
            ok.append((req, t_arrive))
            texts.append(text)
            images.append(imgs)
        if not ok:
            return outs
        sp: SamplingParams = ok[0][0].sampling
        t0 = time.perf_counter()
        batch = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        prompt_lens = batch["attention_mask"].sum(-1).tolist()
        image_id = self.model.config.image_token_id
        n_img = (batch["input_ids"] == image_id).sum(-1).tolist()
        too_long = [i for i, n in enumerate(prompt_lens) if max_len and n + sp.max_new_tokens > max_len]
        if too_long:  # rare: rerun without them rather than fail the whole group
            for i in too_long:
                outs.append(
                    Output(
                        ok[i][0].request_id,
                        finish_reason="error",
                        num_prompt_tokens=prompt_lens[i],
                        error=f"prompt ({prompt_lens[i]} tokens) + max_new_tokens "
                        f"({sp.max_new_tokens}) exceeds max_model_len {max_len}",
                    )
                )
            keep = [i for i in range(len(ok)) if i not in too_long]
            if not keep:
                return outs
            self._waiting.extendleft(reversed([ok[i] for i in keep]))
            return outs
        gen_kw = dict(max_new_tokens=sp.max_new_tokens, pad_token_id=self._pad_id)
        if sp.ignore_eos:
            gen_kw["min_new_tokens"] = sp.max_new_tokens
        if sp.temperature > 0:
            gen_kw.update(do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k or None)
            torch.manual_seed(sp.seed if sp.seed is not None else self.config.seed)
        else:
            gen_kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            seqs = self.model.generate(**batch, **gen_kw)
        t1 = time.perf_counter()
        new = seqs[:, batch["input_ids"].shape[1] :].tolist()
        for (req, t_arrive), toks, plen, ni in zip(ok, new, prompt_lens, n_img):
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
