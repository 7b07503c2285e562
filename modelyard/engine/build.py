"""Engine construction: load the weights, size and allocate the KV pool, wire the parts together.

The two start-up phases a user waits on are timed separately (`load_seconds`, `kv_alloc_seconds`
in Engine.stats(); CUDA-graph capture has its own `cuda_graph_capture_seconds`), so a slow spawn
can be told apart: disk/PCIe-bound weight streaming versus pool allocation on a crowded device.
"""

from __future__ import annotations

import itertools
import time

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from .processor import Processor
from .scheduler import Scheduler, SchedulerConfig


def build_engine_parts(path, config: EngineConfig) -> dict:
    """Everything Engine.__init__ takes, built from an HF-format checkpoint directory."""
    from .attention import get_backend
    from .cuda_graphs import decode_graphs_for
    from .kv_cache import KVCache, KVCacheSpec, estimate_activation_bytes, plan_num_blocks, with_device_budgets
    from .loader import load_model, read_config
    from .quant import check_quantization, quantize_model
    from .runner import ModelRunner

    device = torch.device(config.resolved_device())
    dtype = config.resolved_dtype()
    kv_dtype = config.resolved_kv_cache_dtype()  # raises before any weights load if it cannot run here
    check_quantization(config.quantization, device, dtype)
    t_load = time.perf_counter()
    hf_config = read_config(path)
    max_pos = int(hf_config.text_config.max_position_embeddings)
    max_model_len = config.max_model_len or max_pos
    if max_model_len > max_pos:
        raise ValueError(f"max_model_len {max_model_len} exceeds the checkpoint's max_position_embeddings {max_pos}")
    model = load_model(path, dtype, device, max_model_len)
    if config.quantization is not None:
        quantize_model(model, config.quantization)
    weights_bytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    processor = Processor.from_pretrained(path, image_token_id=model.image_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the copies are asynchronous: count them as loading
        torch.cuda.empty_cache()  # loader staging buffers must not count as "used" below
    load_seconds = time.perf_counter() - t_load

    t_kv = time.perf_counter()
    config = with_device_budgets(config, hf_config, device, dtype, weights_bytes)
    spec = KVCacheSpec(model.num_layers, model.num_kv_heads, model.head_dim, config.block_size, kv_dtype)
    num_blocks, sizing = plan_num_blocks(
        config, spec, device, weights_bytes, estimate_activation_bytes(hf_config, config, dtype), max_model_len
    )
    kv_cache = KVCache(spec, num_blocks, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the pool is zeroed by a kernel: wait for it before timing
    kv_alloc_seconds = time.perf_counter() - t_kv

    attn = get_backend(
        config.attention_backend,
        device,
        head_dim=model.head_dim,
        dtype=dtype,
        k_scale=config.kv_cache_k_scale,
        v_scale=config.kv_cache_v_scale,
    )
    graphs, graphs_note = decode_graphs_for(config, model, kv_cache, attn, device, max_model_len)
    runner = ModelRunner(model, kv_cache, attn, device, config.max_image_batch, graphs=graphs, graphs_note=graphs_note)
    scheduler = Scheduler(
        SchedulerConfig(
            max_batch_size=config.max_batch_size,
            max_prefill_tokens=config.max_prefill_tokens,
            max_model_len=max_model_len,
            eos_token_ids=processor.eos_token_ids,
            reserve_decode_blocks=config.reserve_decode_blocks,
        ),
        BlockManager(num_blocks, config.block_size),
    )
    return dict(
        model=model,
        processor=processor,
        kv_cache=kv_cache,
        runner=runner,
        scheduler=scheduler,
        config=config,
        max_model_len=max_model_len,
        weights_bytes=weights_bytes,
        kv_sizing=sizing,
        load_seconds=load_seconds,
        kv_alloc_seconds=kv_alloc_seconds,
    )
