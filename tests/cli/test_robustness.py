"""What a user's folder or a second terminal can do to a job, met through the CLI as a user meets it:
file names that are not UTF-8, a huge non-image file, a second driver on the same output directory,
another model pointed at a finished directory, one model whose checkpoint cannot load, an output
directory that cannot be written, error texts that must group, and progress into a log file."""

import errno
import json
import os

import pandas as pd
import pytest

from modelyard.cli import main
from modelyard.orchestration.outputs.progress import Progress
from modelyard.orchestration.outputs.store import ResultStore, error_row

NON_UTF8 = b"caf\xe9 \xff.jpg"  # Latin-1 bytes, as old archives and other systems' disks have


@pytest.fixture
def ray_cleanup():
    yield
    import ray

    ray.shutdown()


def _caption(*args) -> int:
    return main(["caption", *map(str, args), "--no-progress", "--max-new-tokens", "3", "--no-report"])


def test_odd_names_and_a_huge_non_image_are_rows_and_a_rerun_finishes(tmp_path, tiny_models, capsys, ray_cleanup):
    from modelyard.testing import make_images

    imgs = tmp_path / "imgs"
    (good,) = make_images(imgs, 1, seed=3)
    os.rename(good, os.path.join(os.fsencode(imgs), NON_UTF8))
    make_images(imgs, 1, seed=4)
    with open(imgs / "huge.jpg", "wb") as f:  # sparse: 600 MiB long, no disk used, never read whole
        f.truncate(600 << 20)
    out = tmp_path / "out"
    assert _caption(tiny_models["llava"], imgs, "--out", out) == 0
    df = pd.read_parquet(out / "results.parquet").set_index("image_id")
    assert len(df) == 3
    odd = "caf\\xe9 \\xff.jpg"  # the odd bytes written as \xNN: stored, shown, stable
    assert df.loc[odd, "finish_reason"] != "error" and df.loc[odd, "caption"]
    assert df.loc["huge.jpg", "finish_reason"] == "error" and not df.loc["huge.jpg", "retryable"]
    assert "exceeds the image file limit" in df.loc["huge.jpg", "error"]
    capsys.readouterr()
    assert _caption(tiny_models["llava"], imgs, "--out", out) == 0  # the rerun finishes, adds nothing
    assert "already done" in capsys.readouterr().out
    assert sum(1 for _ in open(out / "results.jsonl", encoding="utf-8")) == 3

    # the same directory for another model: refused, naming both jobs' models
    assert _caption(tiny_models["qwen"], imgs, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its models are llava; this run's are qwen" in err


def test_a_second_driver_on_the_same_directory_is_refused(tmp_path, tiny_models, capsys):
    from modelyard.testing import make_images

    make_images(tmp_path / "imgs", 1)
    out = tmp_path / "out"
    with ResultStore(out) as first:  # the first driver, still writing
        first.add(
            {"image_id": "x.jpg", "model": "llava", "prompt_id": "default", "caption": "c", "finish_reason": "stop"}
        )
        with open(out / "results.jsonl", "ab") as f:
            f.write(b'{"image_id": "y.jpg", "mod')  # its newest row, half written
        assert _caption(tiny_models["llava"], tmp_path / "imgs", "--out", out) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"is in use by modelyard pid {os.getpid()}" in err and "another output directory" in err
        assert (out / "results.jsonl").read_bytes().endswith(b'"mod')  # the second cut nothing


def _garble(ckpt, tmp_path, name):
    bad = tmp_path / name
    bad.mkdir()
    for f in os.listdir(ckpt):
        if not f.endswith((".safetensors", ".index.json")):
            os.symlink(os.path.join(ckpt, f), bad / f)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    return bad


def test_one_models_bad_checkpoint_gives_its_error_rows_and_the_others_run(tmp_path, tiny_models, capsys, ray_cleanup):
    from modelyard.testing import make_images

    make_images(tmp_path / "imgs", 2)
    garbled = _garble(tiny_models["llava"], tmp_path, "garbled")
    foreign = tmp_path / "foreign"  # an architecture neither the native engine nor transformers knows
    foreign.mkdir()
    for f in os.listdir(tiny_models["qwen"]):
        os.symlink(os.path.join(tiny_models["qwen"], f), foreign / f)
    cfg = json.loads((foreign / "config.json").read_text())
    cfg["architectures"] = ["NoSuchVLMForConditionalGeneration"]
    cfg["model_type"] = "nosuchvlm"
    (foreign / "config.json").unlink()
    (foreign / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    rc = main(
        [
            "compare",
            "--model",
            f"good={tiny_models['llava']}",
            "--model",
            f"garbled={garbled}",
            "--model",
            f"foreign={foreign}",
            str(tmp_path / "imgs"),
            "--out",
            str(out),
            "--no-progress",
            "--max-new-tokens",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 1
    df = pd.read_parquet(out / "results.parquet")
    good, bad, alien = (df[df["model"] == m] for m in ("good", "garbled", "foreign"))
    assert len(good) == 2 and (good["finish_reason"] != "error").all()
    assert len(bad) == 2 and bad["error"].str.contains("not a readable safetensors file").all()
    assert len(alien) == 2 and (alien["finish_reason"] == "error").all()
    assert not bad["retryable"].any() and not alien["retryable"].any()  # a rerun alone cannot fix them
    assert "model 'garbled' cannot run here" in captured.err and "--retry-errors" in captured.err
    assert "rerun the same command to retry" not in captured.err
    summary = json.loads((out / "summary.json").read_text())["models"]
    assert summary["garbled"]["load_error_permanent"] and summary["foreign"]["load_error_permanent"]
    assert summary["good"]["load_error"] is None


@pytest.mark.parametrize(
    "err, rc, hint",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/results.jsonl"), 1, "the disk is full"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/out"), 2, "no permission to write there"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"), 2, "read-only"),
    ],
)
def test_an_output_directory_that_cannot_be_written_is_one_line(
    tmp_path, tiny_models, capsys, monkeypatch, err, rc, hint
):
    from modelyard.orchestration.outputs import store
    from modelyard.testing import make_images

    make_images(tmp_path / "imgs", 1)

    def fail(*a, **k):
        raise err

    monkeypatch.setattr(store.ResultStore, "__init__", fail)
    assert _caption(tiny_models["llava"], tmp_path / "imgs", "--out", tmp_path / "out") == rc
    text = capsys.readouterr().err.strip()
    assert len(text.splitlines()) == 1 and err.filename in text and hint in text and "Traceback" not in text


def test_an_output_path_under_a_file_is_one_line(tmp_path, tiny_models, capsys):
    from modelyard.testing import make_images

    make_images(tmp_path / "imgs", 1)
    (tmp_path / "afile").write_text("x")
    assert _caption(tiny_models["llava"], tmp_path / "imgs", "--out", tmp_path / "afile" / "out") == 2
    text = capsys.readouterr().err.strip()
    assert len(text.splitlines()) == 1 and "Not a directory" in text and "afile" in text


def test_error_texts_carry_no_object_reprs():
    from modelyard.engine.images import ImageError, load_image

    with pytest.raises(ImageError) as e:
        load_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert "0x" not in str(e.value) and "object at" not in str(e.value)
    row = error_row(
        "a", "m", "p", "OSError: cannot identify image file <_io.BytesIO object at 0x7f3a2c1d9e40>", retryable=False
    )
    assert row["error"] == "OSError: cannot identify image file <_io.BytesIO>"


def test_progress_into_a_log_file_is_plain_lines_at_a_bounded_rate(capsys):
    p = Progress(["m"], {"m": 4}, {"m": 0}, enabled=None, line_interval_s=0.0)
    p.submitted("m")
    p.result("m", error=False)
    p.result("m", error=True)
    err = capsys.readouterr().err
    assert "progress m: 2/4 (50%), 1 errors" in err and "img/s, ETA" in err and "\x1b[" not in err
    slow = Progress(["m"], {"m": 4}, {"m": 0}, enabled=None, line_interval_s=3600.0)
    slow.submitted("m")
    slow.result("m", error=False)
    assert capsys.readouterr().err == ""  # at most one line per model per interval
    assert Progress(["m"], {"m": 1}, {"m": 0}, enabled=False).lines is False  # --no-progress: none
