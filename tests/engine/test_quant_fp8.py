"""EngineConfig(quantization="fp8") on the CPU: the per-token quantizer against a hand-written oracle,
Fp8Linear's math, which modules get converted, and the whole engine against a fake-quant oracle model
(every decoder projection an F.linear over hand-rounded fp8 inputs and weights)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelyard import testing
from modelyard.engine import Engine, EngineConfig, Request, SamplingParams
from modelyard.engine import ops
from modelyard.engine.models.decoder import DecoderAttention, DecoderMLP
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
    x[4] = 0.0                                                   # an all-zero row
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
    big = x.float().abs() >= s * 2.0 ** -6                       # e4m3 normals (subnormals: absolute error)
    assert ((deq - x.float()).abs()[big] <= x.float().abs()[big] * 2.0 ** -4 + 1e-30).all()


def test_fp8_linear_math_and_bias():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(48, 32, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 48, generator=g))
        lin.bias.copy_(torch.randn(32, generator=g))
    fq = Fp8Linear.from_linear(lin)
    assert fq.weight.dtype == E4M3 and fq.weight.shape == (32, 48) and fq.weight_scale.shape == (1, 32)
    x = torch.randn(2, 5, 48, generator=g)                       # leading dims are kept
    y = fq(x)
    assert y.shape == (2, 5, 32) and y.dtype == torch.float32
    xq, xs = oracle_quant_rows(x.reshape(-1, 48))
    wq, ws = oracle_quant_rows(lin.weight.detach())
    want = F.linear(xq.float() * xs, wq.float() * ws, lin.bias.detach()).view(2, 5, 32)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    exact = lin(x)
    assert (y - exact).norm() / exact.norm() < 0.06                # quantization error, not garbage


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
    return {"path": testing.make_checkpoint("llava", root / "llava"), "images": testing.make_images(root / "img", 3, seed=2)}


def test_quantize_model_converts_only_decoder_projections(ckpt):
    from modelyard.engine.loader import load_model
    model = load_model(ckpt["path"], torch.float32, "cpu")
    before = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    n_layers = sum(isinstance(m, DecoderAttention) for m in model.modules())
    assert quantize_model(model, "fp8") == 4 * n_layers
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == 4 * n_layers
    assert all(n.rsplit(".", 1)[-1] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj") for n in fp8)
    left = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert left == before - fp8 and left, "vision tower / projector / LM head stay in the model dtype"
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantize_model(model, "int4")


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
    check_quantization("fp8", torch.device("cpu"), torch.float16)   # the float32 emulation runs any dtype
    from modelyard.engine.hf_engine import _check_supported
    with pytest.raises(ValueError, match="native engine"):
        _check_supported(EngineConfig(backend="transformers", quantization="fp8"))
