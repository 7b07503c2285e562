"""benchmarks/step_anatomy.py's removal switch: it stands buffers in for exactly the chosen kernels
and always puts the originals back (a leak would corrupt every later measurement in the process)."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modelyard.engine import ops
from modelyard.engine.attention import base

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "step_anatomy.py"
_spec = importlib.util.spec_from_file_location("step_anatomy", _PATH)
step_anatomy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_anatomy)

SPEC = SimpleNamespace(intermediate_size=24, num_heads=4, head_dim=8)


def _originals():
    return base.AttentionBackend.write_kv, ops.silu_and_mul, ops.paged_decode_attention


@pytest.mark.parametrize("rotary,silu,attention", [(True, False, False), (False, True, False),
                                                   (False, False, True), (True, True, True)])
def test_without_replaces_the_chosen_kernels_and_restores_them(rotary, silu, attention):
    before = _originals()
    with step_anatomy.without(rotary, silu, attention, 8, SPEC, device="cpu"):
        now = _originals()
        assert [a is not b for a, b in zip(before, now)] == [rotary, silu, attention]
        if silu:
            assert ops.silu_and_mul(torch.zeros(3, 48)).shape == (3, 24)
        if attention:
            assert ops.paged_decode_attention(torch.zeros(5, 4, 8), None, None).shape == (5, 4, 8)
        if rotary:
            assert base.AttentionBackend.write_kv(None, 1, 2, 3, 4, None) is None
    assert _originals() == before


def test_without_norms_keeps_the_kernels_but_drops_their_norm_input(monkeypatch):
    """norms=True: write_kv gets the rotary without norm_x / norm_scale, silu_and_mul none; both restored."""
    seen = {}
    monkeypatch.setattr(base.AttentionBackend, "write_kv",
                        lambda self, k, v, kc, vc, meta, q=None, rotary=None: seen.setdefault("rotary", rotary))
    monkeypatch.setattr(ops, "silu_and_mul", lambda x, *a, **kw: seen.setdefault("silu", (a, kw)))
    before = _originals()
    rot = base.Rotary(torch.zeros(2, dtype=torch.long), torch.zeros(4, 8), True, torch.ones(2, 16), 1e-6,
                      torch.ones(2))
    with step_anatomy.without(False, False, False, 8, SPEC, device="cpu", norms=True):
        base.AttentionBackend.write_kv(None, 1, 2, 3, 4, None, None, rot)
        ops.silu_and_mul(torch.zeros(2, 48), norm_scale=torch.ones(2))
    assert seen["rotary"].norm_x is None and seen["rotary"].norm_scale is None
    assert seen["rotary"].positions is rot.positions
    assert seen["silu"] == ((), {})
    assert _originals() == before


def test_without_restores_after_an_error():
    before = _originals()
    with pytest.raises(RuntimeError):
        with step_anatomy.without(True, True, True, 8, SPEC, device="cpu"):
            raise RuntimeError("capture failed")
    assert _originals() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_a_gpu(capsys):
    assert step_anatomy.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
