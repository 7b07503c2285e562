"""Shared fixtures for actor tests: a local Ray per module (so nothing leaks into other test
directories), one tiny checkpoint and sample images per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by the Ray workers started below
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from modelyard.actors import ensure_ray

    started = not ray.is_initialized()
    info = ensure_ray(num_cpus=2, log_to_driver=False)
    yield info
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from modelyard.testing import make_checkpoint

    return make_checkpoint("llava", tmp_path_factory.mktemp("ckpt") / "tiny-llava", size="tiny", seed=0)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    from modelyard.testing import make_images

    return [str(p) for p in make_images(tmp_path_factory.mktemp("imgs"), 8, seed=1)]
