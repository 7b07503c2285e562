"""Suite-wide settings (offline HF, and one torch thread: CI has 2 cores and oversubscribed intra-op
threads made small-model tests 10-50x slower there) and the fixtures orchestration and CLI tests share:
tiny checkpoints and sample images made once per session, Ray once per module."""

import os

import psutil
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Two tiny random-weight checkpoints of different architectures: {name: path}."""
    from modelyard.testing import make_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {
        "llava": str(make_checkpoint("llava", root / "llava", seed=0)),
        "qwen": str(make_checkpoint("llava-qwen2", root / "qwen", seed=1)),
    }


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory):
    from modelyard.testing import make_images

    d = tmp_path_factory.mktemp("imgs")
    make_images(d, 8, seed=0)
    return str(d)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster for this module (started once, shut down after its last test)."""
    import ray

    from modelyard.actors import ensure_ray

    ensure_ray(num_cpus=4)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def kill_ray_cluster():
    """A function that ends a `ray start` cluster by its temp dir, for tests that start their own."""
    return _kill_cluster


def _kill_cluster(temp_dir: str) -> list:
    """Terminate the processes of the cluster whose temp dir is `temp_dir` (their command lines
    name it) and their children (agents, workers); kill what does not exit. Returns survivors."""
    me = os.getpid()
    roots = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid != me and any(temp_dir in a for a in (p.info["cmdline"] or []))
    ]
    procs = {}
    for r in roots:
        try:
            procs.update({p.pid: p for p in [r, *r.children(recursive=True)]})
        except psutil.NoSuchProcess:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    # A short grace period only: the GCS and raylet take ~10 s to exit on SIGTERM, and this
    # cluster is throwaway.
    _, alive = psutil.wait_procs(list(procs.values()), timeout=2)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    return alive
