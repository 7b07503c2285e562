"""ensure_ray: a Ray started by modelyard listens on loopback only, has no dashboard, and keeps
token authentication on."""

import os
import subprocess
import sys

import pytest

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_started_ray_is_loopback_only_with_token_auth(ray_session, tiny_ckpt):
    import psutil
    import ray

    if not ray_session["started"]:
        pytest.skip("Ray was started by someone else in this session; its binding is theirs")
    assert ray_session["auth"] == "token" and ray_session["node_ip"] == "127.0.0.1"

    from actor_testlib import ENGINE

    from modelyard.actors import ModelHandle

    h = ModelHandle(tiny_ckpt, name="netcheck", engine_config=ENGINE, num_gpus=0)
    h.spawn()  # a worker process with its own gRPC server too
    try:
        procs = [psutil.Process()] + psutil.Process().children(recursive=True)
        listening = [
            (p.pid, p.name(), c.laddr.ip, c.laddr.port)
            for p in procs
            for c in _inet(p)
            if c.status == psutil.CONN_LISTEN
        ]
        assert any(pid == h.pid for pid, *_ in listening), "the actor's server was not found"
        assert listening and all(ip in LOOPBACK for _, _, ip, _ in listening), listening
        # Ray always runs its API-server process; without the dashboard it loads no UI modules
        api = [p.cmdline() for p in procs if any(a.endswith("dashboard/dashboard.py") for a in p.cmdline())]
        assert all("--disable-frontend" in c and "--modules-to-load=UsageStatsHead" in c for c in api), api
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    finally:
        h.unload()


def _inet(p):
    import psutil

    try:
        return p.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_disabled_auth_is_refused_before_anything_starts():
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    code = (
        "from modelyard.actors import ensure_ray\n"
        "try:\n    ensure_ray()\nexcept RuntimeError as e:\n    print('REFUSED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "REFUSED" in out.stdout and "token authentication" in out.stdout, out.stdout + out.stderr


def test_local_start_prints_no_token_notice_or_banner_and_keeps_token_auth():
    """Ray's "Token authentication is enabled..." warning and its "Started a local Ray instance."
    banner are dropped while ensure_ray starts the cluster; the cluster still runs with token auth,
    and the filter is gone afterwards."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    code = (
        "import logging, ray\n"
        "from modelyard.actors import ensure_ray\n"
        "info = ensure_ray(num_cpus=1)\n"
        "names = ('ray._private.authentication.authentication_token_setup', 'ray._private.worker')\n"
        "print('AUTH', info['auth'], 'FILTERS', sum(len(logging.getLogger(n).filters) for n in names))\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "AUTH token FILTERS 0" in out.stdout, out.stdout + out.stderr
    assert "Token authentication is enabled" not in out.stderr, out.stderr
    assert "Started a local Ray instance" not in out.stderr, out.stderr


def test_the_start_filter_lets_every_other_record_through():
    import logging

    from modelyard.actors.ray_init import _DropLocalStartNoise

    def record(level, msg, *args):
        return logging.LogRecord("ray._private.worker", level, __file__, 1, msg, args, None)

    f = _DropLocalStartNoise()
    assert not f.filter(
        record(
            logging.WARNING,
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
        )
    )
    assert not f.filter(record(logging.INFO, "Started a local Ray instance."))
    # the banner that carries a dashboard URL, and the real problems, still show
    assert f.filter(record(logging.INFO, "Started a local Ray instance. View the dashboard at %s", "127.0.0.1:8265"))
    assert f.filter(record(logging.WARNING, "Token authentication is disabled for this Ray cluster. Anyone ..."))
    assert f.filter(record(logging.ERROR, "Failed to start the dashboard"))
