"""Vision tower (CLIP-L/336 as LLaVA-1.5 uses it: 23 layers, bf16) under each SDPA backend: the first
call at new batch sizes (cuDNN builds a plan per shape) and the steady time at 26 images, then the
attention op alone. GPU only; random weights.

    python benchmarks/vision_tower.py
"""
import contextlib
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from modelyard.engine.models.vision import VisionSpec, VisionTower


def main() -> None:
    spec = VisionSpec(kind="clip", hidden_size=1024, intermediate_size=4096, num_heads=16, num_layers=24,
                      image_size=336, patch_size=14, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    tower = VisionTower(spec, (23,)).to("cuda", torch.bfloat16)
    for p in tower.parameters():
        torch.nn.init.normal_(p, std=0.02)

    def run_ms(n, reps):
        x = torch.randn(n, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            tower(x)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps * 1e3

    backends = {"default": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
                "efficient": [SDPBackend.EFFICIENT_ATTENTION]}
    print(torch.cuda.get_device_name(), torch.__version__)
    with torch.inference_mode():
        run_ms(8, 1)
        for i, (name, b) in enumerate(backends.items()):
            with sdpa_kernel(b) if b else contextlib.nullcontext():
                firsts = [(n, round(run_ms(n, 1), 1)) for n in (30 + i, 40 + i, 20 + i)]
                steady = run_ms(26, 5)
            print(f"{name:10s} first calls (images, ms): {firsts}  26 images: {steady:.1f} ms "
                  f"({steady / 26:.2f} ms/image)", flush=True)
        q = torch.randn(26, 16, 577, 64, device="cuda", dtype=torch.bfloat16)
        flops = 4 * 26 * 16 * 577 * 577 * 64
        for name, b in backends.items():
            if b is None:
                continue
            with sdpa_kernel(b):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / 20 * 1e3
            print(f"attention {name:10s} {ms * 1e3:.0f} us  {flops / ms / 1e9:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
