"""FlashBackend: prefill through varlen FlashAttention, decode through the csrc split-KV kernel.

Prefill implementations, the first importable one wins (MODELYARD_VARLEN=<name> forces one):
  vllm_flash_attn, standalone or as vllm.vllm_flash_attn   block_table for any block_size % 16
  flash_attn                                              block_table only for block_size % 256
  torch.nn.attention.varlen.varlen_attn (torch >= 2.9)    block_table (torch >= 2.12), block_size % 256
Their signatures differ between releases, so every call is built from the function's actual
parameters and passed by keyword. A prefill whose sequences have no cached prefix attends over the
step's packed K/V directly (the common case: a fresh prompt); with a prefix (chunked prefill) it
reads the paged cache through block_table where the implementation accepts this block size, and
otherwise gathers the context rows into packed K/V first. None of these implementations reads an
fp8 cache, so with one the prefix case always gathers and dequantizes (fresh prompts are unaffected:
they attend over the step's own 16-bit K/V), and the kernels-off decode takes the torch reference.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .. import kernels, ops
from . import BackendUnavailable
from .base import AttentionBackend, AttentionMetadata, Rotary, gather_kv

VARLEN_ENV = "MODELYARD_VARLEN"

# (name, module, attribute, block_size multiple its block_table path accepts: None = probe torch)
_CANDIDATES = (
    ("vllm_flash_attn", "vllm_flash_attn", "flash_attn_varlen_func", 16),
    ("vllm.vllm_flash_attn", "vllm.vllm_flash_attn", "flash_attn_varlen_func", 16),
    ("flash_attn", "flash_attn", "flash_attn_varlen_func", 256),
    ("torch", "torch.nn.attention.varlen", "varlen_attn", None),
)


@dataclass(frozen=True)
class VarlenImpl:
    name: str
    fn: Callable
    params: frozenset
    paged_block_multiple: int | None  # block_table accepted for block sizes divisible by this; None: never

    def supports_paged(self, block_size: int) -> bool:
        return self.paged_block_multiple is not None and block_size % self.paged_block_multiple == 0

    def reads_cache(self, k_cache: torch.Tensor) -> bool:
        """Whether this pool can be passed as-is with a block_table: the block size allows it and
        the elements are the model's (no implementation reads an fp8 cache)."""
        return self.supports_paged(k_cache.shape[1]) and not ops.is_fp8(k_cache)

    def __call__(
        self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, seqused_k=None, block_table=None
    ) -> torch.Tensor:
        """Causal attention, bottom-right aligned when a sequence has more keys than queries."""
        if self.name == "torch":
            return self._torch_call(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqused_k, block_table)
        kw = dict(
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
            softmax_scale=scale,
            causal=True,
        )
        if block_table is not None:
            kw["block_table"] = block_table
        if seqused_k is not None and "seqused_k" in self.params:
            kw["seqused_k"] = seqused_k
        return self.fn(q, k, v, **kw)

    def _torch_call(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, seqused_k, block_table):
        kw = {}
        if "is_causal" in self.params:  # torch 2.9
            kw["is_causal"] = True
        else:  # torch >= 2.10: causal is window (-1, 0)
            kw["window_size"] = (-1, 0)
        if "scale" in self.params:
            kw["scale"] = scale
        elif not math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-6):
            q = q * (scale * math.sqrt(q.shape[-1]))  # the kernel applies 1/sqrt(D); fold the rest into q
        kv_heads = k.shape[-2]
        if "enable_gqa" in self.params and q.shape[1] != kv_heads:
            kw["enable_gqa"] = True
        if block_table is not None:
            kw.update(block_table=block_table, seqused_k=seqused_k)
        return self.fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


@lru_cache(maxsize=1)
def probe_varlen() -> tuple[tuple[VarlenImpl, ...], tuple[tuple[str, str], ...]]:
    """Every importable implementation, in preference order, and a note per candidate for doctor."""
    found, notes = [], []
    for name, module, attr, multiple in _CANDIDATES:
        try:
            fn = getattr(importlib.import_module(module), attr)
        except Exception as e:  # noqa: BLE001 - e.g. the torch-2.4-pinned vllm-flash-attn wheel raises OSError
            notes.append((name, f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"))
            continue
        try:
            params = frozenset(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            params = frozenset()
        if name == "torch" and not {"is_causal", "window_size"} & params:
            notes.append((name, "unavailable (varlen_attn takes neither is_causal nor window_size)"))
            continue
        if multiple is None:
            multiple = 256 if "block_table" in params else None
        found.append(VarlenImpl(name, fn, params, multiple))
        paged = f"paged block_size % {multiple}" if multiple else "no paged KV"
        notes.append((name, f"ok ({paged})"))
    return tuple(found), tuple(notes)


def select_varlen() -> VarlenImpl:
    impls, notes = probe_varlen()
    forced = os.environ.get(VARLEN_ENV, "").strip()
    if forced:
        for impl in impls:
            if impl.name == forced:
                return impl
        raise BackendUnavailable(f"{VARLEN_ENV}={forced!r} is not importable here: {dict(notes)}")
    if not impls:
        raise BackendUnavailable(f"no varlen FlashAttention importable: {dict(notes)}")
    return impls[0]


def cu_seqlens(lens: torch.Tensor) -> torch.Tensor:
    """[S] int32 -> [S + 1] int32 exclusive prefix sum, on the device (no host sync)."""
    return F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))


def context_slots(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, seq_lens_cpu: list[int], block_size: int
) -> torch.Tensor:
    """Cache slots of every context token, sequences concatenated: [sum(seq_lens)] int64.
    seq_lens [S] (device) and its host copy: the host one sizes the outputs, so nothing syncs."""
    dev = block_tables.device
    lens = seq_lens.to(torch.int64)
    n = int(sum(seq_lens_cpu))
    seq_ids = torch.repeat_interleave(torch.arange(len(seq_lens_cpu), device=dev), lens, output_size=n)  # [N]
    starts = torch.cumsum(lens, 0) - lens  # [S]
    pos = torch.arange(n, device=dev) - starts[seq_ids]  # [N]
    blocks = block_tables[seq_ids, pos // block_size].to(torch.int64)
    return blocks * block_size + pos % block_size


def decode_len_hint(meta: AttentionMetadata) -> int | None:
    """The longest context, except under graph capture, where the launch must not depend on it."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return None if capturing else meta.max_seq_len


def prefill_varlen(
    impl: VarlenImpl,
    q,
    k,
    v,
    k_cache,
    v_cache,
    meta: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
):
    """q [T, Hq, D], k/v [T, Hk, D] (already in the cache) -> [T, Hq, D].

    Fresh prompts attend over the step's own K/V. Sequences with a cached prefix (a chunked prompt's
    later chunks) read their context from the cache. The scheduler lists those first, so a step
    that mixes both is split: the leading prefixed sequences take the cache path, the fresh tail
    the direct one, instead of gathering every sequence's K/V from the cache because one needs it."""
    q_lens, seq_lens = meta.query_lens_cpu, meta.seq_lens_cpu
    fresh = [ql == sl for ql, sl in zip(q_lens, seq_lens)]
    if all(fresh):
        cu_q = meta.query_start_loc
        return impl(q, k, v, cu_q, cu_q, meta.max_query_len, meta.max_query_len, scale)
    p = len(fresh)
    while p > 0 and fresh[p - 1]:
        p -= 1  # sequences p.. are fresh; some before p are not
    if p == len(fresh):
        return _prefill_from_cache(impl, q, k_cache, v_cache, meta, scale, k_scale, v_scale)
    r = sum(q_lens[:p])  # query rows of the leading sequences
    head = AttentionMetadata(
        slot_mapping=meta.slot_mapping[:r],
        block_tables=meta.block_tables[:p],
        seq_lens=meta.seq_lens[:p],
        query_start_loc=meta.query_start_loc[: p + 1],
        max_query_len=max(q_lens[:p]),
        max_seq_len=max(seq_lens[:p]),
        seq_lens_cpu=seq_lens[:p],
        query_lens_cpu=q_lens[:p],
        is_decode=False,
    )
    out_head = _prefill_from_cache(impl, q[:r], k_cache, v_cache, head, scale, k_scale, v_scale)
    cu_tail = meta.query_start_loc[p:] - r  # [S - p + 1]
    max_tail = max(q_lens[p:])
    out_tail = impl(q[r:], k[r:], v[r:], cu_tail, cu_tail, max_tail, max_tail, scale)
    return torch.cat([out_head, out_tail])


def _prefill_from_cache(
    impl: VarlenImpl, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale: float, v_scale: float
):
    """Every sequence attends over its whole context as the cache holds it (new rows included)."""
    cu_q = meta.query_start_loc
    block_size = k_cache.shape[1]
    cu_k = cu_seqlens(meta.seq_lens)
    if impl.reads_cache(k_cache):
        return impl(
            q,
            k_cache,
            v_cache,
            cu_q,
            cu_k,
            meta.max_query_len,
            meta.max_seq_len,
            scale,
            seqused_k=meta.seq_lens,
            block_table=meta.block_tables,
        )
    slots = context_slots(meta.block_tables, meta.seq_lens, meta.seq_lens_cpu, block_size)
    hk, d = k_cache.shape[2], k_cache.shape[3]
    k_ctx = gather_kv(k_cache.view(-1, hk, d), slots, q.dtype, k_scale)  # [sum(seq_lens), Hk, D]
    v_ctx = gather_kv(v_cache.view(-1, hk, d), slots, q.dtype, v_scale)
    return impl(q, k_ctx, v_ctx, cu_q, cu_k, meta.max_query_len, meta.max_seq_len, scale)


class FlashBackend(AttentionBackend):
    """Varlen FlashAttention prefill; decode by the csrc kernel (or, with MODELYARD_KERNELS=0,
    by the prefill implementation's paged path where it takes this block size)."""

    name = "flash"

    def __init__(self, varlen: VarlenImpl | None = None, *, k_scale: float = 1.0, v_scale: float = 1.0):
        super().__init__(k_scale=k_scale, v_scale=v_scale)
        if not torch.cuda.is_available():
            raise BackendUnavailable("FlashAttention needs a CUDA device")
        self.varlen = varlen or select_varlen()
        # Builds the kernels now, so a broken build fails at engine start, not mid-request.
        self.csrc_decode = kernels.get() is not None

    @property
    def cuda_graph_safe(self) -> bool:
        """Decode launches without host syncs (the reference decode syncs on seq_lens)."""
        return self.csrc_decode

    def forward(
        self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, rotary: Rotary | None = None
    ) -> torch.Tensor:
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"FlashAttention runs float16/bfloat16, got {q.dtype}; use attention_backend='csrc' "
                "or 'sdpa' for float32"
            )
        self.write_kv(k, v, k_cache, v_cache, meta, q, rotary)
        if not meta.is_decode:
            return prefill_varlen(
                self.varlen, q, k, v, k_cache, v_cache, meta, scale, k_scale=self.k_scale, v_scale=self.v_scale
            )
        if self.csrc_decode:
            return ops.paged_decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                max_seq_len=decode_len_hint(meta),
                k_scale=self.k_scale,
                v_scale=self.v_scale,
            )
        if self.varlen.reads_cache(k_cache):
            return self.varlen(
                q,
                k_cache,
                v_cache,
                meta.query_start_loc,
                cu_seqlens(meta.seq_lens),
                1,
                meta.max_seq_len,
                scale,
                seqused_k=meta.seq_lens,
                block_table=meta.block_tables,
            )
        return ops.paged_decode_attention_ref(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, self.k_scale, self.v_scale
        )


def auto_backend_name() -> str:
    """What attention_backend="auto" should pick here: flash > csrc > sdpa."""
    if not torch.cuda.is_available():
        return "sdpa"
    if probe_varlen()[0]:
        return "flash"
    return "csrc" if kernels.enabled() else "sdpa"


def describe_backends() -> dict:
    """For `modelyard doctor`: the varlen candidates, the decode path, the kernels' build state."""
    impls, notes = probe_varlen()
    try:
        selected = select_varlen().name if torch.cuda.is_available() else None
    except BackendUnavailable as e:
        selected = f"none: {e}"
    on_cuda = torch.cuda.is_available()
    decode = (
        "csrc paged_decode_attention (split-KV)"
        if on_cuda and kernels.enabled()
        else "torch reference (paged_decode_attention_ref)"
    )
    return {
        "auto": auto_backend_name(),
        "prefill_varlen": selected,
        "varlen_candidates": dict(notes),
        "varlen_override_env": VARLEN_ENV,
        "decode": decode,
        "kernels": kernels.status(),
    }
