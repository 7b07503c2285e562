"""Helpers shared by the actor tests (a module name of its own: `conftest` is ambiguous across test dirs)."""

import time

# Actors are CPU-only here (num_gpus=0). The native engine with a small KV pool; the pipeline
# tests run the transformers backend so both go through an actor.
ENGINE = {"backend": "native", "device": "cpu", "num_kv_blocks": 128}
HF_ENGINE = {"backend": "transformers", "device": "cpu"}


def modelyard_actor_names():
    import ray

    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("modelyard:")
    )


def process_gone(pid: int, wait_s: float = 0.0) -> bool:
    """True once `pid` has exited (a zombie awaiting its parent's wait counts as exited)."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        try:
            gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            gone = True
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(0.02)
