"""ModelRunner: turns one SchedulerOutput into a decoder forward over the paged KV pool and samples.

Per step: pack the scheduled spans into [T] token ids and positions, build the AttentionMetadata
(slots, block tables, lengths) on the host and copy it to the device once (pinned, non-blocking),
embed, write image features into the placeholder positions of prefill spans, run the decoder, take
the hidden state of each span's last token when it samples, compute float32 logits and sample.
Decode steps replay a captured CUDA graph (cuda_graphs.DecodeGraphs) when the engine built one.

Image features live here, on the device, from the step a sequence's images are encoded until its
prefill has consumed every row (or it is preempted or finished); the pixels are not kept at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import describe_backend
from .attention.base import AttentionBackend, AttentionMetadata
from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCache
from .models import merge_image_features
from .models.base import NativeVLM
from .sampler import Sampler
from .scheduler import ScheduledSeq, SchedulerOutput

_NOT_AN_ID = -1      # placeholder-mask value for positions that must not take image rows


@dataclass
class _ImageRows:
    rows: torch.Tensor          # [num_image_tokens, hidden], device, model dtype
    consumed: int = 0


class ModelRunner:
    def __init__(self, model: NativeVLM, kv_cache: KVCache, attn: AttentionBackend, device: torch.device,
                 max_image_batch: int, graphs: DecodeGraphs | None = None, graphs_note: str = "off: eager"):
        self.model = model
        self.kv_cache = kv_cache
        self.attn = attn
        self.device = torch.device(device)
        self.block_size = kv_cache.spec.block_size
        self.max_image_batch = max_image_batch
        self.sampler = Sampler()
        self._pin = self.device.type == "cuda"
        self._images: dict[int, _ImageRows] = {}
        self.graphs = graphs
        self.graphs_note = graphs.describe() if graphs is not None else graphs_note
        # Set after a step's GPU work is queued; waiting on it (not on a tensor copy) releases the
        # GIL, so host threads (image preprocessing) run while the GPU works.
        self._step_done = torch.cuda.Event() if self.device.type == "cuda" else None

    # ---- images ------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_images(self, batch: list[tuple[int, torch.Tensor]]) -> None:
        """Encode the images of sequences starting (or restarting) their prefill.

        batch: (seq_id, pixel_values [n_i, 3, H, W]) pairs. Images of equal size from all of them
        go through the tower together, max_image_batch at a time.
        """
        by_shape: dict[tuple, list[tuple[int, int, torch.Tensor]]] = {}
        for seq_id, pixels in batch:
            for j in range(pixels.shape[0]):
                by_shape.setdefault(tuple(pixels.shape[1:]), []).append((seq_id, j, pixels[j]))
        per_seq: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for items in by_shape.values():
            for i in range(0, len(items), self.max_image_batch):
                chunk = items[i:i + self.max_image_batch]
                pixels = torch.stack([p for _, _, p in chunk]).to(self.device, non_blocking=True)
                feats = self.model.encode_images(pixels)                 # [n, tokens, hidden]
                for (seq_id, j, _), f in zip(chunk, feats):
                    per_seq.setdefault(seq_id, []).append((j, f))
        for seq_id, parts in per_seq.items():
            parts.sort(key=lambda x: x[0])
            self._images[seq_id] = _ImageRows(torch.cat([f for _, f in parts]))   # [n_i * tokens, hidden]

    def release(self, seq_id: int) -> None:
        self._images.pop(seq_id, None)

    @property
    def num_held_image_features(self) -> int:
        return len(self._images)

    # ---- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[int, int]:
        """Run the step; returns seq_id -> sampled token for every span with `sample` set."""
        if out.is_empty:
            return {}
        if (self.graphs is not None and not out.is_prefill and self.graphs.covers(len(out.seqs))
                and all(s.sample for s in out.seqs)):
            return self._sample(out.seqs, self.graphs.run(out.seqs))
        ids, positions, slots, mask_ids = self._pack(out.seqs)
        input_ids = self._to_device(ids, torch.int64)                    # [T]
        meta = self._metadata(out.seqs, slots)
        embeds = self.model.embed_tokens(input_ids)                      # [T, hidden]
        rows = self._take_image_rows(out.seqs, mask_ids)
        if rows is not None:
            merge_image_features(embeds, self._to_device(mask_ids, torch.int64), rows,
                                 self.model.image_token_id)
        hidden = self.model(embeds, self._to_device(positions, torch.int64), self.kv_cache.layers,
                            meta, self.attn)                             # [T, hidden]
        sampling = [s for s in out.seqs if s.sample]
        if not sampling:
            return {}
        ends = []
        end = 0
        for s in out.seqs:
            end += s.num_tokens
            if s.sample:
                ends.append(end - 1)
        last = hidden.index_select(0, self._to_device(ends, torch.int64))    # [S', hidden]
        return self._sample(sampling, self.model.compute_logits(last))      # logits [S', vocab] float32

    def _sample(self, seqs, logits: torch.Tensor) -> dict[int, int]:
        """logits [len(seqs), vocab] float32 -> seq_id -> token."""
        if self._step_done is not None:
            self._step_done.record()
            self._step_done.synchronize()
        tokens = self.sampler(logits, [s.sampling for s in seqs], [s.seed for s in seqs],
                              [s.output_index for s in seqs])
        return {s.seq_id: t for s, t in zip(seqs, tokens)}

    def describe(self) -> dict:
        """Attention paths and CUDA-graph state, for Engine.stats()."""
        return {**describe_backend(self.attn), "cuda_graphs": self.graphs_note,
                "cuda_graph_capture_seconds": self.graphs.capture_seconds if self.graphs else 0.0}

    def _pack(self, seqs: tuple[ScheduledSeq, ...]):
        """Host lists for the packed step: token ids, positions, KV slots, and the ids to search
        for image placeholders (None when no prompt position in the step holds one)."""
        bs = self.block_size
        image_id = self.model.image_token_id
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        mask_ids: list[int] = []
        has_placeholders = False
        for s in seqs:
            ids.extend(s.token_ids)
            bt = s.block_table
            for p in range(s.start_pos, s.seq_len):
                positions.append(p)
                slots.append(bt[p // bs] * bs + p % bs)
            # Only prompt positions hold image placeholders; a generated token that happens to be
            # the image token id is an ordinary token (as in transformers' decode steps).
            n_prompt = max(0, min(s.num_tokens, s.num_prompt_tokens - s.start_pos))
            prompt_part = s.token_ids[:n_prompt]
            has_placeholders = has_placeholders or image_id in prompt_part
            mask_ids.extend(prompt_part)
            mask_ids.extend([_NOT_AN_ID] * (s.num_tokens - n_prompt))
        return ids, positions, slots, (mask_ids if has_placeholders else None)

    def _take_image_rows(self, seqs, mask_ids: list[int] | None) -> torch.Tensor | None:
        """The feature rows for the placeholders in this step, in packed order; frees used-up ones."""
        if not mask_ids:
            return None
        image_id = self.model.image_token_id
        parts = []
        start = 0
        for s in seqs:
            n = sum(1 for t in mask_ids[start:start + s.num_tokens] if t == image_id)
            start += s.num_tokens
            if n == 0:
                continue
            held = self._images.get(s.seq_id)
            if held is None:
                raise RuntimeError(f"seq {s.seq_id} reached image placeholders without encoded images")
            parts.append(held.rows[held.consumed:held.consumed + n])
            held.consumed += n
            if held.consumed > held.rows.shape[0]:
                raise RuntimeError(f"seq {s.seq_id} has more image placeholders than feature rows")
            if held.consumed == held.rows.shape[0]:
                del self._images[s.seq_id]
        return torch.cat(parts) if parts else None                       # [K, hidden]

    def _metadata(self, seqs, slots: list[int]) -> AttentionMetadata:
        q_lens = [s.num_tokens for s in seqs]
        seq_lens = [s.seq_len for s in seqs]
        max_blocks = max(-(-n // self.block_size) for n in seq_lens)
        tables = []                                                      # [S, max_blocks], 0-padded
        for s in seqs:
            row = list(s.block_table[:max_blocks])
            tables.append(row + [0] * (max_blocks - len(row)))
        qsl = [0]
        for q in q_lens:
            qsl.append(qsl[-1] + q)
        return AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.int64),
            block_tables=self._to_device(tables, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            query_start_loc=self._to_device(qsl, torch.int32),
            max_query_len=max(q_lens), max_seq_len=max(seq_lens),
            seq_lens_cpu=seq_lens, query_lens_cpu=q_lens,
            is_decode=all(q == 1 for q in q_lens))

    def _to_device(self, data, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cpu":
            return t
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)
