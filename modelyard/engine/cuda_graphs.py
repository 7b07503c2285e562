"""Decode CUDA graphs: the whole decode step (embed -> decoder -> LM head) captured once per
batch-size bucket over static device buffers, then replayed.

A decode step's shapes depend only on how many sequences it runs, so a step of n sequences
replays the graph of the smallest bucket >= n with the unused rows padded. Per step the host
writes the inputs into pinned staging buffers (DecodeStaging), copies them into the static device
buffers with non-blocking copies, replays, and hands back a view of the graph's logits.

Padding rows never touch a real sequence: their slot is PAD_SLOT (the cache write skips negative
slots), their seq_len is 0 (the paged decode kernel reads nothing and writes zeros) and their
block-table row is all block 0, never read at seq_len 0. So no KV block needs to be reserved.

What makes a backend capturable is `cuda_graph_safe`: its decode launches no host sync and its
launch shape is fixed by tensor shapes (the csrc paged kernel picks its split count from the
block-table width under capture). The block tables are [bucket, max_blocks] with max_blocks
covering max_model_len, so one graph serves every context length.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from .attention.base import AttentionBackend, AttentionMetadata
from .config import EngineConfig
from .kv_cache import KVCache
from .scheduler import ScheduledSeq

PAD_SLOT = -1  # reshape_and_cache (kernel and reference) skips negative slots
_SMALL_SIZES = (1, 2, 4, 8)
_STEP = 16  # buckets above 8 are multiples of this: at most 15 padded rows


def graph_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Capture sizes: 1, 2, 4, 8, every multiple of 16 up to max_batch_size, and max_batch_size."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = {s for s in _SMALL_SIZES if s <= max_batch_size}
    sizes.update(range(_STEP, max_batch_size + 1, _STEP))
    sizes.add(max_batch_size)
    return tuple(sorted(sizes))


def pick_bucket(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest size >= n, or None when n exceeds them all (sizes sorted ascending)."""
    if n < 1:
        raise ValueError(f"a decode step needs at least one sequence, got {n}")
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


class DecodeStaging:
    """Host-side inputs of one decode step, padded to a bucket. Pinned when `pin` (CUDA), so the
    copies to the device are truly asynchronous; plain host memory otherwise (tests)."""

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, pin: bool):
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size

        def buf(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self.input_ids = buf(max_batch, dtype=torch.int64)  # [B]
        self.positions = buf(max_batch, dtype=torch.int64)  # [B]
        self.slot_mapping = buf(max_batch, dtype=torch.int64)  # [B]
        self.seq_lens = buf(max_batch, dtype=torch.int32)  # [B]
        self.block_tables = buf(max_batch, max_blocks, dtype=torch.int32)  # [B, MB]
        # numpy views share the memory: element writes through them cost no torch dispatch.
        self._ids, self._pos, self._slots, self._lens, self._tables = (
            t.numpy() for t in (self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables)
        )
        self.fill_padding(max_batch)

    def fill_padding(self, bucket: int, start: int = 0) -> None:
        """Rows [start, bucket) become padding."""
        self._ids[start:bucket] = 0
        self._pos[start:bucket] = 0
        self._slots[start:bucket] = PAD_SLOT
        self._lens[start:bucket] = 0
        self._tables[start:bucket] = 0

    def fill(self, seqs: Sequence[ScheduledSeq], bucket: int) -> None:
        """Rows [0, n) from the decode spans (one new token each), rows [n, bucket) padding."""
        n = len(seqs)
        if not 0 < n <= bucket <= self.max_batch:
            raise ValueError(f"{n} sequences do not fit bucket {bucket} (max {self.max_batch})")
        bs = self.block_size
        ids, pos, slots, lens, tables = self._ids, self._pos, self._slots, self._lens, self._tables
        tables[:bucket] = 0  # no stale block ids from an earlier step's occupant of a row
        for i, s in enumerate(seqs):
            if s.num_tokens != 1:
                raise ValueError(f"seq {s.seq_id}: a decode span has one token, got {s.num_tokens}")
            p = s.start_pos
            nblk = p // bs + 1
            if nblk > self.max_blocks:
                raise ValueError(
                    f"seq {s.seq_id}: {p + 1} tokens exceed the graphs' {self.max_blocks * bs}-token block tables"
                )
            bt = s.block_table
            ids[i] = s.token_ids[0]
            pos[i] = p
            slots[i] = bt[p // bs] * bs + p % bs
            lens[i] = p + 1
            tables[i, :nblk] = bt[:nblk]
        self.fill_padding(bucket, n)


class DecodeGraphs:
    """One captured decode step per bucket, sharing one memory pool and one set of static inputs."""

    def __init__(
        self,
        model,
        kv_cache: KVCache,
        attn: AttentionBackend,
        device: torch.device,
        max_batch_size: int,
        max_model_len: int,
    ):
        if torch.device(device).type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if not getattr(attn, "cuda_graph_safe", False):
            raise ValueError(f"attention backend {attn.name!r} has no graph-safe decode")
        self.model, self.kv_cache, self.attn = model, kv_cache, attn
        self.device = torch.device(device)
        self.sizes = graph_batch_sizes(max_batch_size)
        self.block_size = kv_cache.spec.block_size
        self.max_blocks = -(-max_model_len // self.block_size)
        B = self.sizes[-1]
        self.staging = DecodeStaging(B, self.max_blocks, self.block_size, pin=True)
        dev = self.device
        self.input_ids = torch.zeros(B, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(B, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((B,), PAD_SLOT, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(B, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(B, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}  # bucket -> [bucket, vocab] float32 (graph output)
        self._copied = torch.cuda.Event()  # the last step's staging -> device copies
        self.capture_seconds = 0.0

    def covers(self, n: int) -> bool:
        return pick_bucket(n, self.sizes) is not None

    def _meta(self, b: int) -> AttentionMetadata:
        full = self.max_blocks * self.block_size
        # The host lists only feed reference paths, which graph-safe backends never take.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b],
            seq_lens=self.seq_lens[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            max_query_len=1,
            max_seq_len=full,
            seq_lens_cpu=[full] * b,
            query_lens_cpu=[1] * b,
            is_decode=True,
        )

    def _forward(self, b: int) -> torch.Tensor:
        embeds = self.model.embed_tokens(self.input_ids[:b])  # [b, hidden]
        hidden = self.model(embeds, self.positions[:b], self.kv_cache.layers, self._meta(b), self.attn)
        return self.model.compute_logits(hidden)  # [b, vocab] float32

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller graphs reuse its pool memory.

        The static inputs hold padding only (slot PAD_SLOT, seq_len 0), so the eager warm-up run
        before each capture writes nothing into the KV pool."""
        import time

        t0 = time.perf_counter()
        self.staging.fill_padding(self.sizes[-1])
        self._copy_inputs(self.sizes[-1])
        pool = None
        for b in reversed(self.sizes):
            self._forward(b)  # loads lazily-loaded kernels, lets cuBLAS pick its algorithms
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(b)
            pool = graph.pool()
            self._graphs[b], self._logits[b] = graph, logits
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0

    def _copy_inputs(self, b: int) -> None:
        st = self.staging
        self.input_ids[:b].copy_(st.input_ids[:b], non_blocking=True)
        self.positions[:b].copy_(st.positions[:b], non_blocking=True)
        self.slot_mapping[:b].copy_(st.slot_mapping[:b], non_blocking=True)
        self.seq_lens[:b].copy_(st.seq_lens[:b], non_blocking=True)
        self.block_tables[:b].copy_(st.block_tables[:b], non_blocking=True)
        self._copied.record()

    def run(self, seqs: Sequence[ScheduledSeq]) -> torch.Tensor:
        """Replay the step for these decode spans; returns logits [n, vocab] float32 (a view of the
        graph's output buffer: valid until the next run)."""
        n = len(seqs)
        b = pick_bucket(n, self.sizes)
        if b is None:
            raise ValueError(f"{n} sequences exceed the largest captured batch {self.sizes[-1]}")
        # The staging buffers are rewritten below: the previous step's copies must have read them.
        self._copied.synchronize()
        self.staging.fill(seqs, b)
        self._copy_inputs(b)
        self._graphs[b].replay()
        return self._logits[b][:n]

    def replay(self, b: int) -> torch.Tensor:
        """Replay bucket b on whatever the static inputs hold (benchmarks: pure GPU step time)."""
        self._graphs[b].replay()
        return self._logits[b]

    def describe(self) -> str:
        return f"on: {len(self.sizes)} batch sizes {self.sizes[0]}..{self.sizes[-1]}"


def decode_graphs_for(
    config: EngineConfig, model, kv_cache: KVCache, attn: AttentionBackend, device: torch.device, max_model_len: int
) -> tuple[DecodeGraphs | None, str]:
    """The engine's captured decode graphs, or None and why not (Engine.stats()["cuda_graphs"]).
    A failed capture raises: a broken fast path is not replaced by a slow one behind the user's back."""
    if device.type != "cuda":
        return None, "off: not a CUDA device"
    if config.enforce_eager:
        return None, "off: enforce_eager=True"
    if not getattr(attn, "cuda_graph_safe", False):
        return None, f"off: attention backend {attn.name!r} has no graph-safe decode"
    graphs = DecodeGraphs(model, kv_cache, attn, device, config.max_batch_size, max_model_len)
    try:
        graphs.capture()
    except Exception as e:
        raise RuntimeError(
            f"capturing the decode CUDA graphs failed ({type(e).__name__}: {e}); "
            f"EngineConfig(enforce_eager=True) runs without them"
        ) from e
    return graphs, graphs.describe()
