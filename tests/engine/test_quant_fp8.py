"""EngineConfig(quantization="fp8") on the CPU: the per-token quantizer against a hand-written oracle,
Fp8Linear's math, which modules get converted, the norm / activation ops that write the projections'
inputs already quantized, and the whole engine against a fake-quant oracle model (every decoder
projection an F.linear over hand-rounded fp8 inputs and weights)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelyard import testing
from modelyard.engine import Engine, EngineConfig, Request, SamplingParams, ops
from modelyard.engine.models.decoder import DecoderAttention, DecoderLayer, DecoderMLP
from modelyard.engine.models.layers import QuantizedInput, RMSNorm
from modelyard.engine.quant import Fp8Linear, check_quantization, quantize_model

E4M3 = torch.float8_e4m3fn


def oracle_quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row in plain Python: scale = max|row| / 448 (1e-12 floor), q = round(row / scale)."""
    qs, scales = [], []
    for row in x.float():
        amax = max(max(abs(v) for v in row.tolist()), 1e-12)
        scale = torch.tensor(amax, dtype=torch.float32) / 448.0
        q = torch.clamp(row / scale, -448.0, 448.0).to(E4M3)
        qs.append(q)
        scales.append(scale)
    return torch.stack(qs), torch.stack(scales).view(-1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_quant_matches_oracle(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(9, 40, generator=g) * torch.logspace(-3, 3, 9).view(-1, 1)).to(dtype)
    x[4] = 0.0  # an all-zero row
    q, s = ops.per_token_quant_fp8_ref(x)
    oq, os_ = oracle_quant_rows(x)
    assert q.dtype == E4M3 and q.shape == x.shape and s.shape == (9, 1) and s.dtype == torch.float32
    assert torch.equal(q.view(torch.uint8), oq.view(torch.uint8))
    assert torch.equal(s, os_)
    assert torch.equal(q[4].float(), torch.zeros(40)) and float(s[4]) > 0
    # every non-zero row uses the full range: its largest element becomes exactly +-448
    nz = [i for i in range(9) if i != 4]
    assert torch.equal(q[nz].float().abs().amax(-1), torch.full((8,), 448.0))
    # e4m3 keeps 3 mantissa bits: relative error of a normal value at most 2^-4
    deq = q.float() * s
    big = x.float().abs() >= s * 2.0**-6  # e4m3 normals (subnormals: absolute error)
    assert ((deq - x.float()).abs()[big] <= x.float().abs()[big] * 2.0**-4 + 1e-30).all()


def test_fp8_linear_math_and_bias():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(48, 32, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 48, generator=g))
        lin.bias.copy_(torch.randn(32, generator=g))
    fq = Fp8Linear.from_linear(lin)
    assert fq.weight.dtype == E4M3 and fq.weight.shape == (32, 48) and fq.weight_scale.shape == (1, 32)
    x = torch.randn(2, 5, 48, generator=g)  # leading dims are kept
    y = fq(x)
    assert y.shape == (2, 5, 32) and y.dtype == torch.float32
    xq, xs = oracle_quant_rows(x.reshape(-1, 48))
    wq, ws = oracle_quant_rows(lin.weight.detach())
    want = F.linear(xq.float() * xs, wq.float() * ws, lin.bias.detach()).view(2, 5, 32)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    exact = lin(x)
    assert (y - exact).norm() / exact.norm() < 0.06  # quantization error, not garbage


def assert_same_quant(got, want):
    (q, s), (wq, ws) = got, want
    assert q.dtype == E4M3 and s.dtype == torch.float32 and s.shape == (*q.shape[:-1], 1)
    assert torch.equal(s, ws)
    assert torch.equal(q.view(torch.uint8), wq.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_quant_ops_equal_unfused_composition(dtype):
    """The quantizing norm / activation ops (CPU: their references) = the 16-bit op, then the oracle."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 40, generator=g) * torch.logspace(-3, 3, 9).view(-1, 1)).to(dtype)
    r = torch.randn(9, 40, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(40, generator=g)).to(dtype)
    gate_up = (torch.randn(9, 80, generator=g) * 3).to(dtype)
    x[4], r[4], gate_up[4] = 0.0, 0.0, 0.0  # all-zero rows
    assert_same_quant(ops.rms_norm_quant_fp8(x, w, 1e-6), oracle_quant_rows(ops.rms_norm_ref(x, w, 1e-6)))
    q, s, res = ops.fused_add_rms_norm_quant_fp8(x, r, w, 1e-5)
    normed, want_res = ops.fused_add_rms_norm_ref(x, r, w, 1e-5)
    assert_same_quant((q, s), oracle_quant_rows(normed))
    assert torch.equal(res, want_res) and res.dtype == dtype
    assert_same_quant(ops.silu_and_mul_quant_fp8(gate_up), oracle_quant_rows(ops.silu_and_mul_ref(gate_up)))
    # leading dims are kept, as by the 16-bit ops
    q, s = ops.rms_norm_quant_fp8(x.view(3, 3, 40), w, 1e-6)
    assert q.shape == (3, 3, 40) and s.shape == (3, 3, 1)
    q, s, res = ops.fused_add_rms_norm_quant_fp8(x.view(3, 3, 40), r.view(3, 3, 40), w, 1e-6)
    assert q.shape == res.shape == (3, 3, 40) and s.shape == (3, 3, 1)
    q, s = ops.silu_and_mul_quant_fp8(gate_up.view(3, 3, 80))
    assert q.shape == (3, 3, 40) and s.shape == (3, 3, 1)


class FakeQuantLinear(nn.Module):
    """The oracle's projection: float32 F.linear of hand-rounded fp8 input and weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        wq, ws = oracle_quant_rows(linear.weight.detach())
        self.weight = wq.float() * ws
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        lead = x.shape[:-1]
        xq, xs = oracle_quant_rows(x.reshape(-1, x.shape[-1]))
        return F.linear(xq.float() * xs, self.weight, self.bias).view(*lead, -1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {
        "path": testing.make_checkpoint("llava", root / "llava"),
        "images": testing.make_images(root / "img", 3, seed=2),
    }


def test_quantize_model_converts_only_decoder_projections(ckpt):
    from modelyard.engine.loader import load_model

    model = load_model(ckpt["path"], torch.float32, "cpu")
    before = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    n_layers = sum(isinstance(m, DecoderAttention) for m in model.modules())
    import weakref

    old = [
        weakref.ref(m.weight)
        for m in model.modules()
        if isinstance(m, (DecoderAttention, DecoderMLP))
        for m in m.children()
        if isinstance(m, nn.Linear)
    ]
    dead_at_call = []
    real = Fp8Linear.from_linear.__func__

    def counting(cls, linear):
        dead_at_call.append(sum(r() is None for r in old))
        return real(cls, linear)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Fp8Linear, "from_linear", classmethod(counting))
        assert quantize_model(model, "fp8") == 4 * n_layers
    assert len(old) == 4 * n_layers and all(r() is None for r in old), "16-bit weights still held"
    # peak memory: by the k-th conversion all but the current module's projections are freed
    assert all(dead >= k - 2 for k, dead in enumerate(dead_at_call)), dead_at_call
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == 4 * n_layers
    assert all(n.rsplit(".", 1)[-1] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj") for n in fp8)
    left = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert left == before - fp8 and left, "vision tower / projector / LM head stay in the model dtype"
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantize_model(model, "int4")


def test_quantize_model_fuses_input_quantization_into_decoder_norms(ckpt):
    from modelyard.engine.loader import load_model

    model = load_model(ckpt["path"], torch.float32, "cpu")
    norms = {n: m for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    assert not any(m.quant_out for m in norms.values())
    quantize_model(model, "fp8")
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    flagged = {n for n, m in norms.items() if m.quant_out}
    want = {n for n in norms if n.rsplit(".", 1)[-1] in ("input_layernorm", "post_attention_layernorm")}
    assert flagged == want and len(want) == 2 * len(layers)
    assert set(norms) - flagged, "the final norm feeds the 16-bit LM head and stays unquantized"
    assert all(m.quant_act for m in model.modules() if isinstance(m, DecoderMLP))

    # A quantized input feeds the projection exactly like the 16-bit one it quantizes itself
    layer = layers[0]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, layer.input_layernorm.weight.shape[0], generator=g)
    res = torch.randn(x.shape, generator=g)
    fused = layer.input_layernorm(x)
    assert isinstance(fused, QuantizedInput)
    fused_add, fused_res = layer.post_attention_layernorm(x, res)
    fused_mlp = layer.mlp(x)
    layer.input_layernorm.quant_out = layer.post_attention_layernorm.quant_out = layer.mlp.quant_act = False
    assert torch.equal(layer.self_attn.qkv_proj(fused), layer.self_attn.qkv_proj(layer.input_layernorm(x)))
    plain_add, plain_res = layer.post_attention_layernorm(x, res)
    assert torch.equal(layer.mlp(fused_add), layer.mlp(plain_add)) and torch.equal(fused_res, plain_res)
    assert torch.equal(fused_mlp, layer.mlp(x))


def test_engine_fp8_takes_projection_inputs_from_fused_ops(ckpt, monkeypatch):
    """Per forward step only o_proj quantizes its own input; the norms and silu_and_mul write the rest."""
    from modelyard.engine.loader import read_config

    num_layers = read_config(ckpt["path"]).text_config.num_hidden_layers
    cfg = EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64, max_batch_size=4, quantization="fp8")
    eng = Engine.from_pretrained(ckpt["path"], cfg)
    calls = Counter()
    for name in (
        "per_token_quant_fp8",
        "rms_norm_quant_fp8",
        "fused_add_rms_norm_quant_fp8",
        "silu_and_mul_quant_fp8",
        "rms_norm",
        "fused_add_rms_norm",
        "silu_and_mul",
    ):
        fn = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _fn=fn, _name=name: (calls.update([_name]), _fn(*a))[1])
    try:
        sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
        outs = eng.generate([Request(image=str(ckpt["images"][0]), prompt="Describe the image.", sampling=sp)])
        assert outs[0].error is None, outs[0].error
    finally:
        eng.close()
    steps = calls["rms_norm_quant_fp8"]  # the first layer's input norm, once per step
    assert steps >= 3
    assert calls["fused_add_rms_norm_quant_fp8"] == (2 * num_layers - 1) * steps
    assert calls["silu_and_mul_quant_fp8"] == num_layers * steps
    assert calls["per_token_quant_fp8"] == num_layers * steps
    assert calls["fused_add_rms_norm"] == steps  # the final norm
    assert calls["rms_norm"] == calls["silu_and_mul"] == 0


def _gen(path, images, cfg):
    eng = Engine.from_pretrained(path, cfg)
    try:
        sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
        outs = eng.generate([Request(image=str(p), prompt="Describe the image.", sampling=sp) for p in images])
        assert all(o.error is None for o in outs), [o.error for o in outs]
        return [o.token_ids for o in outs], eng.stats()
    finally:
        eng.close()


def test_engine_fp8_matches_fake_quant_oracle(ckpt, monkeypatch):
    cfg = EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64, max_batch_size=4)
    got, stats = _gen(ckpt["path"], ckpt["images"], cfg.replace(quantization="fp8"))
    assert stats["quantization"] == "fp8"
    _, plain = _gen(ckpt["path"], ckpt["images"], cfg)
    assert stats["weights_bytes"] < plain["weights_bytes"]

    # The oracle engine: the same checkpoint, with each decoder projection swapped for FakeQuantLinear
    # (no Fp8Linear, no ops.per_token_quant_fp8, no fp8 matmul path).
    def fake_quantize(model, method):
        for module in list(model.modules()):
            if isinstance(module, (DecoderAttention, DecoderMLP)):
                for name, child in list(module.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(module, name, FakeQuantLinear(child))

    monkeypatch.setattr("modelyard.engine.quant.quantize_model", fake_quantize)
    want, _ = _gen(ckpt["path"], ckpt["images"], cfg.replace(quantization="fp8"))
    assert got == want


def test_config_and_backend_checks():
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int8")
    check_quantization(None, torch.device("cpu"), torch.float16)
    check_quantization("fp8", torch.device("cpu"), torch.float16)  # the float32 emulation runs any dtype
    from modelyard.engine.hf_engine import _check_supported

    with pytest.raises(ValueError, match="native engine"):
        _check_supported(EngineConfig(backend="transformers", quantization="fp8"))
