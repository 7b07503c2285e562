"""The `modelyard` command line: help texts, `run JOBFILE`, and `modelyard demo` end to end (in a
fresh process, as a user runs it), its report opened in headless Chromium."""

import html.parser
import os
import shutil
import subprocess
import sys
import tempfile

import pandas as pd
import pytest

from modelyard.cli import main

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.parametrize(
    "cmd, expect",
    [
        ("caption", ["--prompt", "--engine", "--address", "resumes"]),
        ("compare", ["--model", "--mode", "parallel", "auto", "--replicas"]),
        ("run", ["ray job submit", "--out"]),
        ("demo", ["random-weight", "--out"]),
        ("make-model", ["--size", "llava"]),
        ("doctor", ["NVML", "--address"]),
        ("build-kernels", ["--arch"]),
    ],
)
def test_every_command_has_helpful_help(cmd, expect, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in expect:
        assert word in text, (cmd, word)


def test_bad_arguments_are_clear(capsys, tmp_path):
    assert main(["compare", "--model", str(tmp_path), str(tmp_path)]) == 2
    assert "at least two --model" in capsys.readouterr().err
    (tmp_path / "job.toml").write_text('output_dir = "o"\n[inputs]\ndirectory = "x"\n')
    assert main(["run", str(tmp_path / "job.toml")]) == 2
    assert "models" in capsys.readouterr().err


def test_make_model_still_works(tmp_path, capsys):
    assert main(["make-model", "llava", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    # a second time into the same (now non-empty) directory: refused, so a real checkpoint is never overwritten
    assert main(["make-model", "llava", str(tmp_path / "m")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["make-model", "llava", str(tmp_path / "q"), "--size", "llava-qwen2-1.5b"]) == 2
    assert "not defined for 'llava'" in capsys.readouterr().err


def _one_line_error(capsys, argv, *words):
    """The command fails with exit code 2 and a single line on stderr naming the problem."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_user_mistakes_end_in_one_line_before_anything_starts(tmp_path, capsys):
    """Each of these fails in the driver before Ray or a model starts (the suite would otherwise
    spend seconds per case), with exit code 2 and one line saying what is wrong."""
    ckpt, imgs, empty = tmp_path / "ckpt", tmp_path / "imgs", tmp_path / "empty"
    for d in (ckpt, imgs, empty):
        d.mkdir()
    (ckpt / "config.json").write_text("{}")
    (imgs / "a.jpg").write_bytes(b"x")
    c, i = str(ckpt), str(imgs)
    _one_line_error(capsys, ["caption", c, str(tmp_path / "nope")], "IMAGES", "does not exist")
    _one_line_error(capsys, ["caption", c, str(empty)], "no images in")
    _one_line_error(capsys, ["caption", c, str(tmp_path / "*.png")], "no files match")
    _one_line_error(capsys, ["caption", str(tmp_path / "nomodel"), i], "does not exist", "Hub id")
    _one_line_error(capsys, ["caption", str(empty), i], "no config.json")
    _one_line_error(capsys, ["caption", c, i, "--engine", "max_batch_size=abc"], "max_batch_size must be an integer")
    _one_line_error(capsys, ["caption", c, i, "--engine", "max_batchsize=4"], "did you mean 'max_batch_size'")
    _one_line_error(capsys, ["caption", c, i, "--engine", "backend=foo"], "backend must be one of")
    _one_line_error(capsys, ["caption", c, i, "--engine", "nokv"], "KEY=VALUE")
    _one_line_error(capsys, ["caption", c, i, "--max-new-tokens", "0"], "max_new_tokens must be >= 1")
    _one_line_error(capsys, ["caption", c, i, "--address", "http://127.0.0.1:8265"], "dashboard URL")
    _one_line_error(capsys, ["compare", "--model", c, "--model", c, i], "label them with --model NAME=PATH")
    _one_line_error(capsys, ["run", str(tmp_path / "missing.toml")], "job file not found")
    job = tmp_path / "job.toml"
    job.write_text(f'output_dir = "o"\n[inputs]\ndirectory = "{i}"\n[[models]]\npath = "{c}"\nreplicas = "2"\n')
    _one_line_error(capsys, ["run", str(job)], "replicas must be an integer, got '2'")
    job.write_text(f'output_dir = "o"\nmax_in_flght = 2\n[inputs]\ndirectory = "{i}"\n[[models]]\npath = "{c}"\n')
    _one_line_error(capsys, ["run", str(job)], "did you mean 'max_in_flight'")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("modelyard ")


def test_run_jobfile(tmp_path, capsys):
    """`modelyard run job.toml` on one tiny model (the CLI path that `ray job submit` uses)."""
    import ray

    from modelyard.testing import make_checkpoint, make_images

    make_checkpoint("llava", tmp_path / "ckpt")
    make_images(tmp_path / "imgs", 3)
    (tmp_path / "job.toml").write_text(
        'output_dir = "out"\nmax_in_flight = 2\n[inputs]\ndirectory = "imgs"\n[sampling]\nmax_new_tokens = 4\n'
        '[[prompts]]\nid = "d"\ntext = "Describe the image."\n[[models]]\nname = "tiny"\npath = "ckpt"\n'
    )
    try:
        assert main(["run", str(tmp_path / "job.toml"), "--no-progress"]) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "results:" in out and "report:" in out
    df = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(df) == 3 and set(df["prompt_id"]) == {"d"} and (df["finish_reason"] != "error").all()


class _Text(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells = []

    def handle_data(self, data):
        self.cells.append(data)


def _norm(s: str) -> str:
    return " ".join(s.split())


@pytest.mark.timeout(300)
def test_demo_writes_a_report_that_opens_in_a_headless_browser(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelyard.cli",
            "demo",
            "--out",
            str(out),
            "--images",
            "4",
            "--max-new-tokens",
            "6",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "RANDOM WEIGHTS" in text and "modelyard compare --model llava-hf/" in text
    assert "captions identical across sequential, parallel: yes" in text
    report = out / "parallel" / "report.html"
    assert f"open the report: {report}" in text and report.is_file()

    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"{CHROMIUM} not installed (apt-get install -y chromium) — the browser half of this test is skipped"
        )
    profile = tempfile.mkdtemp()
    try:
        dom = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--dump-dom",
                report.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert dom.returncode == 0 and "<table" in dom.stdout, dom.stderr[-2000:]
    parser = _Text()
    parser.feed(dom.stdout)
    page_cells = {_norm(c) for c in parser.cells}
    captions = pd.read_parquet(out / "parallel" / "results.parquet")["caption"]
    assert len(captions) == 8
    for cap in captions:
        assert _norm(cap) in page_cells, cap  # every caption rendered, as text, in the browser's DOM
    assert dom.stdout.count("data:image/jpeg;base64,") == 4


def test_the_job_file_in_run_help_is_a_valid_job(tmp_path):
    """The job file `modelyard run --help` shows loads as written (a help text that lies is worse than none)."""
    import textwrap

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    from modelyard.cli.parser import _RUN_EPILOG
    from modelyard.orchestration import job_from_dict

    sample = _RUN_EPILOG.split("\n\n")[0].split("\n", 1)[1]
    job = job_from_dict(tomllib.loads(textwrap.dedent(sample)), base_dir=tmp_path)
    assert job.mode == "auto" and job.models[0].engine == {"max_batch_size": 32}
    assert job.output_dir == str(tmp_path / "runs" / "job")
