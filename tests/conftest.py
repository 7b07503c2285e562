"""Suite-wide settings (offline HF, and one torch thread: CI has 2 cores and oversubscribed intra-op
threads made small-model tests 10-50x slower there) and the fixtures orchestration and CLI tests share:
tiny checkpoints and sample images made once per session, Ray once per module."""
import os

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
    return {"llava": str(make_checkpoint("llava", root / "llava", seed=0)),
            "qwen": str(make_checkpoint("llava-qwen2", root / "qwen", seed=1))}


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
