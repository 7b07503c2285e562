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

import numpy as np
import torch

from .attention import describe_backend
from .attention.base import AttentionBackend, AttentionMetadata
from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCache
from .models.base import NativeVLM
from .sampler import Sampler
from .scheduler import ScheduledSeq, SchedulerOutput

_NOT_AN_ID = -1  # placeholder-mask value for positions that must not take image rows


@dataclass
class _ImageRows:
    rows: torch.Tensor  # [num_image_tokens, hidden], device, model dtype
    consumed: int = 0


class ModelRunner:
    def __init__(
        self,
        model: NativeVLM,
        kv_cache: KVCache,
        attn: AttentionBackend,
        device: torch.device,
        max_image_batch: int,
        graphs: DecodeGraphs | None = None,
        graphs_note: str = "off: eager",
    ):
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
                chunk = items[i : i + self.max_image_batch]
                # One asynchronous copy per image straight into the batch (pinned sources on
                # CUDA): no host-side stack, and the host never waits on a pageable transfer.
                pixels = torch.empty(
                    (len(chunk), *chunk[0][2].shape), dtype=chunk[0][2].dtype, device=self.device
                )  # [n, 3, H, W]
                for k, (_, _, p) in enumerate(chunk):
                    pixels[k].copy_(p, non_blocking=True)
                feats = self.model.encode_images(pixels)  # [n, tokens, hidden]
                for (seq_id, j, _), f in zip(chunk, feats):
                    per_seq.setdefault(seq_id, []).append((j, f))
        for seq_id, parts in per_seq.items():
            parts.sort(key=lambda x: x[0])
            self._images[seq_id] = _ImageRows(torch.cat([f for _, f in parts]))  # [n_i * tokens, hidden]

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
        if (
            self.graphs is not None
            and not out.is_prefill
            and self.graphs.covers(len(out.seqs))
            and all(s.sample for s in out.seqs)
        ):
            return self._sample(out.seqs, self.graphs.run(out.seqs))
        ids, positions, slots, image_pos = self._pack(out.seqs)
        input_ids = self._to_device(ids, torch.int64)  # [T]
        meta = self._metadata(out.seqs, slots)
        embeds = self.model.embed_tokens(input_ids)  # [T, hidden]
        if len(image_pos):
            # Placeholder positions were found on the host, so this needs no device sync.
            rows = self._take_image_rows(out.seqs, image_pos)  # [K, hidden]
            embeds.index_copy_(0, self._to_device(image_pos, torch.int64), rows.to(embeds.dtype))
        hidden = self.model(
            embeds, self._to_device(positions, torch.int64), self.kv_cache.layers, meta, self.attn
        )  # [T, hidden]
        sampling = [s for s in out.seqs if s.sample]
        if not sampling:
            return {}
        ends = []
        end = 0
        for s in out.seqs:
            end += s.num_tokens
            if s.sample:
                ends.append(end - 1)
        last = hidden.index_select(0, self._to_device(ends, torch.int64))  # [S', hidden]
        return self._sample(sampling, self.model.compute_logits(last))  # logits [S', vocab] float32

    def _sample(self, seqs, logits: torch.Tensor) -> dict[int, int]:
        """logits [len(seqs), vocab] float32 -> seq_id -> token."""
        if self._step_done is not None:
            self._step_done.record()
            self._step_done.synchronize()
        tokens = self.sampler(
            logits, [s.sampling for s in seqs], [s.seed for s in seqs], [s.output_index for s in seqs]
        )
        return {s.seq_id: t for s, t in zip(seqs, tokens)}

    def describe(self) -> dict:
        """Attention paths and CUDA-graph state, for Engine.stats()."""
        return {
            **describe_backend(self.attn),
            "cuda_graphs": self.graphs_note,
            "cuda_graph_capture_seconds": self.graphs.capture_seconds if self.graphs else 0.0,
        }

    def _pack(self, seqs: tuple[ScheduledSeq, ...]):
        """Host arrays for the packed step: token ids, positions and KV slots [T] int64, and the
        packed positions of image placeholders [K]. numpy, not Python loops: a 16k-token prefill
        step is packed while the GPU idles, so every millisecond here is a millisecond of GPU time."""
        bs = self.block_size
        n = sum(s.num_tokens for s in seqs)
        ids = np.fromiter((t for s in seqs for t in s.token_ids), dtype=np.int64, count=n)
        positions = np.empty(n, dtype=np.int64)
        slots = np.empty(n, dtype=np.int64)
        is_prompt = np.zeros(n, dtype=bool)
        off = 0
        for s in seqs:
            k = s.num_tokens
            pos = np.arange(s.start_pos, s.start_pos + k, dtype=np.int64)
            positions[off : off + k] = pos
            table = np.asarray(s.block_table[: (s.start_pos + k - 1) // bs + 1], dtype=np.int64)
            slots[off : off + k] = table[pos // bs] * bs + pos % bs
            # Only prompt positions hold image placeholders; a generated token that happens to be
            # the image token id is an ordinary token (as in transformers' decode steps).
            is_prompt[off : off + max(0, min(k, s.num_prompt_tokens - s.start_pos))] = True
            off += k
        image_pos = np.flatnonzero(is_prompt & (ids == self.model.image_token_id))
        return ids, positions, slots, image_pos

    def _take_image_rows(self, seqs, image_pos: np.ndarray) -> torch.Tensor:
        """The feature rows for the placeholders at packed positions image_pos, in packed order;
        frees used-up ones."""
        ends = np.cumsum([s.num_tokens for s in seqs])
        counts = np.bincount(np.searchsorted(ends, image_pos, side="right"), minlength=len(seqs))
        parts = []
        for s, n in zip(seqs, counts.tolist()):
            if n == 0:
                continue
            held = self._images.get(s.seq_id)
            if held is None:
                raise RuntimeError(f"seq {s.seq_id} reached image placeholders without encoded images")
            parts.append(held.rows[held.consumed : held.consumed + n])
            held.consumed += n
            if held.consumed > held.rows.shape[0]:
                raise RuntimeError(f"seq {s.seq_id} has more image placeholders than feature rows")
            if held.consumed == held.rows.shape[0]:
                del self._images[s.seq_id]
        return torch.cat(parts)  # [K, hidden]

    def _metadata(self, seqs, slots: np.ndarray) -> AttentionMetadata:
        q_lens = [s.num_tokens for s in seqs]
        seq_lens = [s.seq_len for s in seqs]
        max_blocks = max(-(-n // self.block_size) for n in seq_lens)
        tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)  # [S, max_blocks], 0-padded
        for i, s in enumerate(seqs):
            row = s.block_table[:max_blocks]
            tables[i, : len(row)] = row
        qsl = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=qsl[1:])
        return AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.int64),
            block_tables=self._to_device(tables, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            query_start_loc=self._to_device(qsl, torch.int32),
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            seq_lens_cpu=seq_lens,
            query_lens_cpu=q_lens,
            is_decode=all(q == 1 for q in q_lens),
        )

    def _to_device(self, data, dtype: torch.dtype) -> torch.Tensor:
        t = (
            torch.from_numpy(np.ascontiguousarray(data)).to(dtype)
            if isinstance(data, np.ndarray)
            else torch.tensor(data, dtype=dtype)
        )
        if self.device.type == "cpu":
            return t
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)
