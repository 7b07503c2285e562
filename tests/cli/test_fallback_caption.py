"""Architectures without native code caption through the transformers fallback with no --engine flag,
and the job's summary, console table and report say which backend ran each model."""

import json

import pandas as pd
import pytest

from modelyard.cli import main
from modelyard.testing import make_checkpoint, make_images
from modelyard.testing.fallback import FALLBACK_ARCHITECTURES, make_fallback_checkpoint


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    make_images(d, 2, seed=6)
    return d


@pytest.mark.parametrize("arch", FALLBACK_ARCHITECTURES)
def test_caption_runs_an_architecture_without_native_code(arch, images, tmp_path, ray_local, capsys):
    ckpt = make_fallback_checkpoint(arch, tmp_path / arch)
    out = tmp_path / "out"
    rc = main(["caption", str(ckpt), str(images), "--out", str(out), "--no-progress", "--max-new-tokens", "3"])
    assert rc == 0, capsys.readouterr()
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 2 and (df["finish_reason"] != "error").all() and (df["num_generated_tokens"] == 3).all()
    summary = json.loads((out / "summary.json").read_text())["models"][arch]
    assert summary["backend"] == "transformers" and summary["errors"] == 0
    assert any("transformers backend: architecture" in n for n in summary["notes"])
    printed = capsys.readouterr().out
    assert any(line.startswith(arch) and " transformers " in line for line in printed.splitlines())


def test_compare_report_names_each_models_backend(images, tmp_path, ray_local):
    native = make_checkpoint("llava", tmp_path / "llava")
    fallback = make_fallback_checkpoint("llava-next", tmp_path / "next")
    out = tmp_path / "out"
    args = ["compare", "--model", f"a={native}", "--model", f"b={fallback}", str(images), "--out", str(out)]
    assert main([*args, "--no-progress", "--max-new-tokens", "3"]) == 0
    models = json.loads((out / "summary.json").read_text())["models"]
    assert models["a"]["backend"] == "native" and models["b"]["backend"] == "transformers"
    html = (out / "report.html").read_text()
    assert "<th>backend</th>" in html and '<td class="num">native</td>' in html
    assert '<td class="num">transformers</td>' in html
