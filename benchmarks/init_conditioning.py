"""How well-conditioned greedy decoding of a random-weight llava checkpoint is, per weight-init variant (CPU).

For each variant: greedy tokens of transformers in float32 and bfloat16 (batch 8) and bfloat16 batch 1,
their agreement (mean fraction of tokens identical up to the first divergence), a smooth estimate of the
per-step flip probability from teacher-forced logits (top-2 gap in fp32 against the spread of its bf16
error), and the diversity of the captions. Weights are bf16-representable, so only compute precision
differs. Results and reasoning: benchmarks/NOTES-init.md.

    python benchmarks/init_conditioning.py --shape reduced --images 32 \
        --variants 'plain;{"lm_scale":8};{"plan":{"_BRANCH_FRACTION":0.2}}'

A variant is `plain` (the weights of tied/tiny checkpoints), a JSON dict of changes to the plain weights
(emb_std, lm_scale, resid: scale o_proj/down_proj and the vision out_proj/fc2 by 1/sqrt(2 layers),
lm_row_sigma: log-normal lm_head row norms), or {"plan": {constant: value}, "seed": s}: the shipped
modelyard.testing_weights.InitPlan with some of its module constants overridden.
"""
from __future__ import annotations

import argparse
import json
import math
import time
import zlib
from pathlib import Path

import torch

from modelyard import testing, testing_weights


def _shape(text_hidden, text_layers, heads, inter):
    return testing._Shape(
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             image_size=112, patch_size=14, projection_dim=256, hidden_act="quick_gelu"),
        dict(hidden_size=text_hidden, intermediate_size=inter, num_hidden_layers=text_layers,
             num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
             rms_norm_eps=1e-5, vocab_size=32064),
        dict(vision_feature_layer=-2, vision_feature_select_strategy="default"))


SHAPES = {"reduced": _shape(512, 8, 8, 1376), "deep": _shape(1024, 16, 16, 2752),
          "tiny": testing.ARCHITECTURES["llava"][2]["tiny"]}


def plain_variant(name, shape, v: dict, layers: dict):
    """The plain init (testing_weights.InitPlan._draw with the small embedding), changed as `v` asks."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 2**63)
    leaf = name.rsplit(".", 1)[-1]
    if any(k in name for k in ("norm", "layrnorm", "layernorm", "ln_")):
        return (torch.zeros if leaf == "bias" else torch.ones)(shape)
    if leaf == "bias" or len(shape) != 2 or ("embed" in name and "embed_tokens" not in name):
        return torch.randn(shape, generator=gen) * 0.02
    scale = v.get("emb_std", 0.02) if "embed_tokens" in name else shape[1] ** -0.5
    tower = "text" if "language_model" in name else "vision"
    if v.get("resid") and any(name.endswith(k + ".weight") for k in ("o_proj", "down_proj", "out_proj", "fc2")):
        scale *= (2 * layers[tower]) ** -0.5
    if name == "lm_head.weight":
        scale *= v.get("lm_scale", 1.0)
    t = torch.randn(shape, generator=gen) * scale
    if name == "lm_head.weight" and v.get("lm_row_sigma"):
        t = t * torch.exp(v["lm_row_sigma"] * torch.randn(shape[0], 1, generator=gen))
    return t


def prefix_agreement(a, b) -> float:
    fracs = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) / len(x) for x, y in zip(a, b)]
    return sum(fracs) / len(fracs)


def flip_probability(ref, other) -> float:
    """Mean over steps of P(noise > top-2 gap): gap from `ref` logits, noise spread from `other` - `ref`."""
    top = ref.topk(2, dim=-1)                                                  # [N, T, 2]
    gap = top.values[..., 0] - top.values[..., 1]                              # [N, T]
    gap2 = other.gather(-1, top.indices[..., :1])[..., 0] - other.gather(-1, top.indices[..., 1:])[..., 0]
    sigma = max((gap2 - gap).std().item(), 1e-9)
    return (0.5 * torch.erfc(gap / sigma / math.sqrt(2))).mean().item()


def measure(model, proc, images, text, n_new):
    pad = proc.tokenizer.pad_token_id

    def generate(chunk, dtype):
        inp = proc(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**dict(inp, pixel_values=inp["pixel_values"].to(dtype)), max_new_tokens=n_new,
                                 min_new_tokens=n_new, do_sample=False, pad_token_id=pad)
        return out[:, inp["input_ids"].shape[1]:].tolist()

    def run(dtype, batch):
        model.to(dtype)
        return [s for i in range(0, len(images), batch) for s in generate(images[i:i + batch], dtype)]

    f32, b8, b1 = run(torch.float32, 8), run(torch.bfloat16, 8), run(torch.bfloat16, 1)
    # teacher-forced logits of the fp32 captions: fp32 batch 8, bf16 batch 8, bf16 batch 1
    logits = {k: [] for k in ("f32", "b8", "b1")}
    for c in range(0, len(images), 8):
        inp = proc(images=images[c:c + 8], text=[text] * len(images[c:c + 8]), return_tensors="pt", padding=True)
        ids = torch.cat([inp["input_ids"], torch.tensor(f32[c:c + 8])], 1)                     # [B, P + n]
        mask = torch.cat([inp["attention_mask"], torch.ones(len(ids), n_new, dtype=torch.long)], 1)
        with torch.inference_mode():
            for key, dtype in (("f32", torch.float32), ("b8", torch.bfloat16)):
                model.to(dtype)
                out = model(input_ids=ids, attention_mask=mask, pixel_values=inp["pixel_values"].to(dtype))
                logits[key].append(out.logits[:, -n_new - 1:-1].float())                     # [B, n, V]
            for r in range(len(ids)):
                out = model(input_ids=ids[r:r + 1, mask[r].bool()],
                            pixel_values=inp["pixel_values"][r:r + 1].to(torch.bfloat16))
                logits["b1"].append(out.logits[:, -n_new - 1:-1].float())
    lg = {k: torch.cat(v) for k, v in logits.items()}
    p16, pb = flip_probability(lg["f32"], lg["b8"]), flip_probability(lg["b8"], lg["b1"])
    model.to(torch.float32)
    return dict(bf16_vs_fp32=round(prefix_agreement(f32, b8), 3), b1_vs_b8=round(prefix_agreement(b1, b8), 3),
                p_step_bf16_fp32=round(p16, 5), p_step_b1_b8=round(pb, 5),
                predicted_agreement_32=round(sum((1 - p16) ** k for k in range(1, 33)) / 32, 3),
                predicted_agreement_64=round(sum((1 - p16) ** k for k in range(1, 65)) / 64, 3),
                distinct_tokens_per_caption=round(sum(len(set(s)) for s in f32) / len(f32), 1),
                distinct_captions=len({tuple(s) for s in f32}), captions=len(f32),
                cross_image_agreement=round(prefix_agreement(f32, f32[1:] + f32[:1]), 3))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="reduced")
    ap.add_argument("--variants", required=True, help="';'-separated: plain | JSON dict (see module doc)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--workdir", default="/tmp/init_conditioning")
    args = ap.parse_args()
    from PIL import Image
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    root = Path(args.workdir) / args.shape
    if not (root / "config.json").exists():
        testing.ARCHITECTURES["llava"][2][args.shape] = SHAPES[args.shape]
        testing.make_checkpoint("llava", root, size=args.shape, dtype="bfloat16")
    proc = AutoProcessor.from_pretrained(root)
    proc.tokenizer.padding_side = "left"
    cfg = LlavaConfig.from_pretrained(root)
    images = [Image.open(p).convert("RGB") for p in testing.make_images(Path(args.workdir) / "img", args.images)]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    names = testing._param_shapes(cfg)
    layers = {"text": cfg.text_config.num_hidden_layers, "vision": cfg.vision_config.num_hidden_layers}
    model = LlavaForConditionalGeneration(cfg).eval()
    defaults = {k: getattr(testing_weights, k) for k in dir(testing_weights) if k.startswith("_") and k.isupper()}
    for spec in args.variants.split(";"):
        v = json.loads(spec) if spec.strip().startswith("{") else {}
        t0 = time.time()
        if "plan" in v:
            for k, val in dict(defaults, **v["plan"]).items():
                setattr(testing_weights, k, val)
            plan = testing_weights.InitPlan.for_config(cfg, v.get("seed", 0), testing_weights.special_ids(root))
            sd = {n: plan.tensor(n, s, "bfloat16", "cpu").float() for n, s in names}
        else:
            sd = {n: plain_variant(n, s, v, layers).bfloat16().float() for n, s in names}
        model.to(torch.float32).load_state_dict(sd, strict=False)
        row = dict(variant=spec.strip(), **measure(model, proc, images, text, args.new_tokens),
                   seconds=round(time.time() - t0, 1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
