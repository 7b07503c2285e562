"""ensure_ray(address=...): joining token-authenticated local clusters by a loopback address.

Each cluster here is private to its test (own temp dir, free ports, own token file) and is
stopped by killing exactly its own processes: other Ray clusters may be running on this machine.
The joining drivers run in subprocesses, since this process already has its own Ray.
"""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

# Joins, then proves the connection is usable with a task; prints what the client ended up with.
JOIN = """
import os, sys
import ray
from modelyard.actors import ensure_ray
info = ensure_ray(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=0)
def worker_pid():
    return os.getpid()

pid = ray.get(worker_pid.remote(), timeout=60)
print("JOINED", info["auth"], os.environ.get("RAY_AUTH_MODE"), pid != os.getpid(), flush=True)
ray.shutdown()
"""

# Starts a cluster the modelyard way, prints its address, keeps it until stdin closes.
HOST = """
import sys
import ray
from modelyard.actors import ensure_ray
print("ADDRESS", ensure_ray(num_cpus=1, log_to_driver=False)["address"], flush=True)
sys.stdin.read()
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def auth_env(tmp_path):
    """An environment with a fresh token of our own and no inherited Ray address or auth mode."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_TOKEN_PATH=str(token), HF_HUB_OFFLINE="1")
    return env


def _join(address: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", JOIN, address], env=env, capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


def test_join_ray_start_cluster_with_token_auth(auth_env, kill_ray_cluster):
    """`ray start --head` with token auth; RAY_AUTH_MODE unset in the client: a plain ray.init
    would be refused ("InvalidAuthToken"), ensure_ray turns token auth on for the join."""
    temp_dir = tempfile.mkdtemp(prefix="myj-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--port",
        str(port),
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "1",
        "--num-gpus",
        "0",
        "--include-dashboard",
        "false",
        "--dashboard-port",
        str(_free_port()),
        "--dashboard-agent-listen-port",
        str(_free_port()),
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(
            cmd, env={**auth_env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120
        )
        assert started.returncode == 0, started.stdout + started.stderr
        t0 = time.monotonic()
        out = _join(f"127.0.0.1:{port}", auth_env)
        assert "JOINED token token True" in out, out
        assert time.monotonic() - t0 < 60
    finally:
        survivors = kill_ray_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not survivors, survivors


def test_join_loopback_cluster_started_by_ensure_ray(auth_env):
    """A modelyard-started cluster listens on 127.0.0.1 only; ensure_ray joins it by the address
    it reported (Ray alone would rewrite 127.0.0.1 to the outbound IP and be refused)."""
    host = subprocess.Popen(
        [sys.executable, "-c", HOST],
        env=auth_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 120
        while not line.startswith("ADDRESS") and time.monotonic() < deadline and host.poll() is None:
            line = host.stdout.readline()
        assert line.startswith("ADDRESS 127.0.0.1:"), line
        address = line.split()[1]
        assert "JOINED token token True" in _join(address, auth_env)
    finally:
        family = psutil.Process(host.pid).children(recursive=True) if host.poll() is None else []
        host.stdin.close()  # the host shuts its Ray down and exits
        try:
            host.wait(timeout=60)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait()
        _, alive = psutil.wait_procs(family, timeout=15)
        for p in alive:
            p.kill()
    assert host.returncode == 0 and not alive
