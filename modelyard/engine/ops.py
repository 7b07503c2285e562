"""Fused ops used by the native models. Each has a plain torch reference (CPU path, test oracle);
on CUDA the csrc kernels replace them when built (see `modelyard.engine.kernels`).

Shapes follow vLLM's conventions so the kernels are drop-in:
  rms_norm(x [T, H], weight [H], eps) -> [T, H]
  fused_add_rms_norm(x [T, H], residual [T, H], weight, eps) -> (normed [T, H], new_residual [T, H])
  rotary_embedding(positions [T], q [T, Hq*D], k [T, Hk*D], head_dim, cos_sin_cache [max_pos, D], is_neox)
      -> in place on q and k; cos_sin_cache rows are [cos(D/2) | sin(D/2)]
  silu_and_mul(x [T, 2I]) -> [T, I]
  reshape_and_cache(k [T, Hk, D], v [T, Hk, D], k_cache, v_cache [NB, BS, Hk, D], slot_mapping [T],
                    k_scale, v_scale)
  paged_decode_attention(q [S, Hq, D], k_cache, v_cache, block_tables [S, MB], seq_lens [S], scale,
                         k_scale, v_scale) -> [S, Hq, D]
  per_token_quant_fp8(x [M, K]) -> (q [M, K] float8_e4m3fn, scales [M, 1] float32)
  rms_norm_quant_fp8(x [T, H], weight, eps) -> per_token_quant_fp8(rms_norm(x, weight, eps))
  fused_add_rms_norm_quant_fp8(x, residual, weight, eps) -> (q [T, H], scales [T, 1], new_residual [T, H])
  silu_and_mul_quant_fp8(x [T, 2I]) -> per_token_quant_fp8(silu_and_mul(x))

KV cache dtype: the model's dtype, or float8_e4m3fn (the fp8 cache). An fp8 cache stores
x / scale rounded to e4m3 and saturated at +-448 (k_scale for keys, v_scale for values, per tensor,
default 1.0); readers multiply by the scale. `dequantize_kv` is that read for the gather paths.

The CUDA ops (csrc/, torch.ops.modelyard.*) compute the same functions with the same rounding
points; none of them syncs with the host, so all are usable inside CUDA graph capture.
"""

from __future__ import annotations

import torch


def _kernels(t: torch.Tensor):
    """torch.ops.modelyard when `t` lives on CUDA and the kernels are enabled, else None.

    On CUDA this builds the kernels on first use; a failed build raises (kernels.KernelBuildError)
    rather than quietly running the references.
    """
    if t.device.type != "cuda":
        return None
    from . import kernels

    return kernels.get()


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)  # cast before the weight multiply, as the HF Llama/Qwen2 norms do


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    k = _kernels(x)
    if k is not None:
        return k.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm_ref(x, residual, weight, eps):
    residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(residual, weight, eps), residual


def fused_add_rms_norm(x, residual, weight, eps):
    """-> (rms_norm(x + residual), x + residual); neither input is modified."""
    k = _kernels(x)
    if k is not None:
        h = x.shape[-1]
        normed, new_residual = k.fused_add_rms_norm(x.reshape(-1, h), residual.reshape(-1, h), weight, eps)
        return normed.view(x.shape), new_residual.view(x.shape)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def build_cos_sin_cache(
    head_dim: int, max_pos: int, base: float, inv_freq: torch.Tensor | None = None, device=None
) -> torch.Tensor:
    """[max_pos, head_dim] float32: cos in the first half, sin in the second."""
    if inv_freq is None:
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_pos, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq.to(torch.float64))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(torch.float32).to(device)


def rotary_embedding_ref(positions, q, k, head_dim, cos_sin_cache, is_neox=True):
    cs = cos_sin_cache[positions]  # [T, D]
    cos, sin = cs.chunk(2, dim=-1)  # [T, D/2] each
    for x in (q, k):
        T = x.shape[0]
        xv = x.view(T, -1, head_dim)
        xf = xv.float()
        c, s = cos[:, None, :], sin[:, None, :]
        if is_neox:
            x1, x2 = xf[..., : head_dim // 2], xf[..., head_dim // 2 :]
            out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        else:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
        xv.copy_(out.to(x.dtype))
    return q, k


def rotary_embedding(positions, q, k, head_dim, cos_sin_cache, is_neox=True):
    kern = _kernels(q)
    if kern is not None:
        kern.rotary_embedding(positions, q, k, head_dim, cos_sin_cache, is_neox)
        return q, k
    return rotary_embedding_ref(positions, q, k, head_dim, cos_sin_cache, is_neox)


def rotary_embedding_and_cache_ref(
    positions,
    q,
    k,
    v,
    k_cache,
    v_cache,
    slot_mapping,
    head_dim,
    cos_sin_cache,
    is_neox=True,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
):
    """rotary_embedding_ref on q and k [T, Hk, D] in place, then reshape_and_cache_ref of k and v."""
    rotary_embedding_ref(positions, q, k, head_dim, cos_sin_cache, is_neox)
    reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rotary_embedding_and_cache(
    positions,
    q,
    k,
    v,
    k_cache,
    v_cache,
    slot_mapping,
    head_dim,
    cos_sin_cache,
    is_neox=True,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
):
    """The rotary embedding and the cache write in one kernel on CUDA (the same results as the two ops)."""
    kern = _kernels(q)
    if kern is not None:
        kern.rotary_embedding_and_cache(
            positions,
            q,
            k,
            v,
            k_cache,
            v_cache,
            slot_mapping,
            head_dim,
            cos_sin_cache,
            is_neox,
            float(k_scale),
            float(v_scale),
        )
        return
    rotary_embedding_and_cache_ref(
        positions, q, k, v, k_cache, v_cache, slot_mapping, head_dim, cos_sin_cache, is_neox, k_scale, v_scale
    )


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    k = _kernels(x)
    if k is not None:
        return k.silu_and_mul(x)
    return silu_and_mul_ref(x)


FP8_KV_DTYPE = torch.float8_e4m3fn
_FP8_MAX = 448.0  # largest finite e4m3fn value; the CUDA conversion saturates there too


def is_fp8(t_or_dtype) -> bool:
    dtype = t_or_dtype if isinstance(t_or_dtype, torch.dtype) else t_or_dtype.dtype
    return dtype == FP8_KV_DTYPE


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """What the cache stores for x: x itself (cast) for a 16/32-bit cache, round(x / scale) saturated
    to e4m3 for the fp8 cache (torch's own cast would turn out-of-range values into NaN)."""
    if cache_dtype != FP8_KV_DTYPE:
        return x.to(cache_dtype)
    return (x.float() / scale).clamp_(-_FP8_MAX, _FP8_MAX).to(cache_dtype)


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Cache entries -> values in `dtype` (the inverse of quantize_kv up to its rounding)."""
    if x.dtype != FP8_KV_DTYPE:
        return x.to(dtype)
    return (x.float() * scale).to(dtype) if scale != 1.0 else x.to(dtype)


def reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0):
    """Negative slots mark padding rows (e.g. a CUDA graph's unused tail) and are skipped."""
    nb, bs = k_cache.shape[:2]
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    # index_copy_ has no float8 kernel: scatter through a same-width integer view instead.
    kq, vq = quantize_kv(k, k_cache.dtype, k_scale), quantize_kv(v, v_cache.dtype, v_scale)
    kc, vc = k_cache.view(nb * bs, *k_cache.shape[2:]), v_cache.view(nb * bs, *v_cache.shape[2:])
    if is_fp8(k_cache):
        kc, vc, kq, vq = kc.view(torch.uint8), vc.view(torch.uint8), kq.view(torch.uint8), vq.view(torch.uint8)
    kc.index_copy_(0, slot_mapping, kq)
    vc.index_copy_(0, slot_mapping, vq)


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0):
    kern = _kernels(k)
    if kern is not None:
        return kern.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale))
    return reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_decode_attention_ref(
    q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale: float = 1.0, v_scale: float = 1.0
):
    """Gather each sequence's blocks and attend with plain softmax; float32 math."""
    S, Hq, D = q.shape
    Hk = k_cache.shape[2]
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    lens = seq_lens.tolist()
    for i in range(S):
        n = lens[i]
        nblk = (n + bs - 1) // bs
        blocks = block_tables[i, :nblk].long()
        k = dequantize_kv(k_cache[blocks].reshape(-1, Hk, D)[:n], torch.float32, k_scale)  # [n, Hk, D]
        v = dequantize_kv(v_cache[blocks].reshape(-1, Hk, D)[:n], torch.float32, v_scale)
        k = k.repeat_interleave(Hq // Hk, dim=1)
        v = v.repeat_interleave(Hq // Hk, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        p = scores.softmax(-1)
        out[i] = torch.einsum("hn,nhd->hd", p, v).to(q.dtype)
    return out


def paged_decode_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    scale,
    max_seq_len: int | None = None,
    num_splits: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
):
    """max_seq_len (a hint: the longest seq_len, or None for block_tables' width) and num_splits
    (0: automatic) only choose the CUDA kernel's split-KV parallelism; results do not depend on them.
    Pass max_seq_len=None under CUDA graph capture so the launch shape is fixed by tensor shapes."""
    kern = _kernels(q)
    if kern is not None:
        return kern.paged_decode_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            scale,
            -1 if max_seq_len is None else int(max_seq_len),
            int(num_splits),
            0,
            float(k_scale),
            float(v_scale),
        )
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)


_MIN_AMAX = 1e-12  # an all-zero row still gets a positive scale (csrc/quant_kernels.cu: kMinAmax)


def per_token_quant_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scales [M, 1] float32), x ~= q * scales per row.
    scale = max|x_row| / 448, so every row uses e4m3's full range; q rounds to nearest, saturated."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_AMAX)  # [M, 1]
    # Divide by a device tensor, not a Python float: CUDA turns division by a host scalar into a
    # multiplication by its reciprocal, which is not the correctly rounded quotient the kernel computes.
    scales = amax / amax.new_full((), _FP8_MAX)
    return (xf / scales).clamp_(-_FP8_MAX, _FP8_MAX).to(FP8_KV_DTYPE), scales


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kern = _kernels(x)
    if kern is not None:
        return kern.per_token_quant_fp8(x)
    return per_token_quant_fp8_ref(x)


# The fp8 linear layers' inputs straight from the producing kernel: one pass writes e4m3 and the
# per-token scales instead of a 16-bit tensor that per_token_quant_fp8 then reads back. The CUDA ops
# are bit-identical to the CUDA composition (same rounding of the 16-bit values, then the same
# quantization); the references are literally the composition of the references.


def rms_norm_quant_fp8_ref(x, weight, eps):
    return per_token_quant_fp8_ref(rms_norm_ref(x, weight, eps))


def rms_norm_quant_fp8(x, weight, eps):
    """x [..., H] -> (q [..., H] e4m3, scales [..., 1] float32) of rms_norm(x, weight, eps)."""
    k = _kernels(x)
    if k is not None:
        q, scales = k.rms_norm_quant_fp8(x.reshape(-1, x.shape[-1]), weight, eps)
        return q.view(x.shape), scales.view(*x.shape[:-1], 1)
    return rms_norm_quant_fp8_ref(x, weight, eps)


def fused_add_rms_norm_quant_fp8_ref(x, residual, weight, eps):
    normed, residual = fused_add_rms_norm_ref(x, residual, weight, eps)
    return (*per_token_quant_fp8_ref(normed), residual)


def fused_add_rms_norm_quant_fp8(x, residual, weight, eps):
    """-> (q, scales) of rms_norm(x + residual), and x + residual; neither input is modified."""
    k = _kernels(x)
    if k is not None:
        h = x.shape[-1]
        q, scales, new_residual = k.fused_add_rms_norm_quant_fp8(x.reshape(-1, h), residual.reshape(-1, h), weight, eps)
        return q.view(x.shape), scales.view(*x.shape[:-1], 1), new_residual.view(x.shape)
    return fused_add_rms_norm_quant_fp8_ref(x, residual, weight, eps)


def silu_and_mul_quant_fp8_ref(x):
    return per_token_quant_fp8_ref(silu_and_mul_ref(x))


def silu_and_mul_quant_fp8(x):
    """x [..., 2I] -> (q [..., I] e4m3, scales [..., 1] float32) of silu_and_mul(x)."""
    k = _kernels(x)
    if k is not None:
        return k.silu_and_mul_quant_fp8(x)
    return silu_and_mul_quant_fp8_ref(x)
