"""The README's Ray cluster commands, run as written against a local `ray start --head` with token
authentication: generate the token, start the head, `ray job submit` a `modelyard run`. Only what
names this machine is substituted (HEAD, ports, paths), so a README that stops working fails here."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_cluster_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- cluster-commands -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines, cont = [], ""
    for raw in block.splitlines():
        line = raw.split("  #", 1)[0].rstrip()  # the README's end-of-line comments
        if line.endswith("\\"):
            cont += line[:-1] + " "
            continue
        if (cont + line).strip():
            lines.append((cont + line).strip())
        cont = ""
    return lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_cluster_commands_work_as_written(tmp_path, kill_ray_cluster):
    pytest.importorskip("aiohttp", reason="the Ray job CLI needs ray[default] (the test extra installs it)")
    from modelyard.testing import make_checkpoint, make_images

    commands = _readme_cluster_commands()
    install, token, start, submit = commands  # the README's four steps, in this order
    assert install.startswith("pip install") and "[cluster]" in install
    assert token == "ray get-auth-token --generate"
    assert start.startswith("RAY_AUTH_MODE=token ray start --head") and submit.startswith("RAY_AUTH_MODE=token ray job")

    make_checkpoint("llava", tmp_path / "ckpt")
    make_images(tmp_path / "imgs", 3)
    wd = tmp_path / "wd"
    (wd / "examples").mkdir(parents=True)
    (wd / "examples" / "job.toml").write_text(
        f'[inputs]\ndirectory = "{tmp_path / "imgs"}"\n[sampling]\nmax_new_tokens = 3\n'
        f'[[models]]\nname = "tiny"\npath = "{tmp_path / "ckpt"}"\n'
    )
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="myc-", dir="/tmp")  # Ray's socket paths must stay short
    gcs, dash = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    out = tmp_path / "out"
    start = start.replace("--dashboard-host 0.0.0.0", "--dashboard-host 127.0.0.1") + (
        f" --port {gcs} --dashboard-port {dash} --node-ip-address 127.0.0.1 --num-cpus 2 --num-gpus 0"
        f" --dashboard-agent-listen-port {_free_port()} --temp-dir {temp_dir} --disable-usage-stats"
    )
    submit = re.sub(r"http://HEAD:8265", f"http://127.0.0.1:{dash}", submit).replace("/shared/runs/job", str(out))
    try:
        for cmd in (token, start, submit):
            done = subprocess.run(cmd, shell=True, cwd=wd, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert (home / ".ray" / "auth_token").is_file()
        df = pd.read_parquet(out / "results.parquet")
        assert len(df) == 3 and (df["finish_reason"] != "error").all()
        # without the token the cluster refuses the same submission
        bare = subprocess.run(
            submit, shell=True, cwd=wd, env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120
        )
        assert bare.returncode != 0 and "auth" in (bare.stdout + bare.stderr).lower()
    finally:
        survivors = kill_ray_cluster(temp_dir)  # this cluster only, not other Rays on the machine
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not survivors, survivors
