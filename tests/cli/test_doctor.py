"""`modelyard doctor` tells the truth about this machine: on a CPU it says plainly there is no GPU
and no NVML and that the sdpa reference runs; for a checkpoint it prints the backend its head size
and dtype get, as the engine itself resolves it (on a GPU too, where the test runs there)."""

import importlib.util

import pytest
import torch

from modelyard.cli.doctor import run_doctor
from modelyard.engine.attention import resolve_backend_name


def test_doctor_on_this_machine(tiny_models, capsys):
    rc = run_doctor(start_ray=False, models=[tiny_models["llava"], "/nonexistent/model"])
    out = capsys.readouterr().out
    assert rc == 1 and "1 check(s) failed" in out  # the nonexistent model, and nothing else
    assert "[FAIL] model          /nonexistent/model: cannot read its config" in out
    assert "ray cluster    not checked (--no-ray)" in out
    if importlib.util.find_spec("torchvision") is None:  # listed, but not counted as a failure
        assert "[--  ] processors     torchvision not installed: Qwen2-VL" in out and "pip install torchvision" in out
    model_line = next(line for line in out.splitlines() if line.startswith("[ok  ] model") and "head_dim 16" in line)
    if torch.cuda.is_available():
        assert "[ok  ] GPU 0" in out and "NVML GPU 0" in out
        expect = resolve_backend_name("auto", "cuda", head_dim=16, dtype=torch.bfloat16)
        assert f"auto -> {expect} on cuda" in model_line
    else:
        assert "[--  ] GPU            none:" in out and "Models run on the CPU" in out
        assert "NVML" in out
        assert "auto -> sdpa on cpu" in out and "auto -> sdpa on cpu (float32)" in model_line
        assert "no CUDA device: the torch reference ops run instead" in out
        # head_dim 16 has no csrc decode instance, so a GPU would fall back to sdpa: doctor says so
        assert "has no instance for head_dim 16, so auto picks sdpa" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks the per-checkpoint choice on cuda")
def test_doctor_reports_the_gpu_choice_for_a_real_head_size(tmp_path, capsys):
    import json
    from pathlib import Path

    from modelyard.testing import make_checkpoint

    path = Path(make_checkpoint("llava-qwen2", tmp_path / "q", size="tiny"))
    cfg = json.loads((path / "config.json").read_text())
    text = cfg["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    run_doctor(start_ray=False, models=[str(path)])
    out = capsys.readouterr().out
    expect = resolve_backend_name("auto", "cuda", head_dim=head_dim, dtype=torch.bfloat16)
    assert f"auto -> {expect} on cuda (bfloat16)" in out
    assert "CUDA kernels" in out and "sm_" in out
