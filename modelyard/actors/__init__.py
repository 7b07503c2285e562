"""Model actors: one Ray actor process per model; unloading kills it and NVML verifies the reclaim."""

from .errors import ActorDied, EngineFailed, LoadFailed, UnloadError, is_permanent
from .handle import ModelHandle


def __getattr__(name):
    # ray is imported only when an actor class or Ray setup is actually needed.
    if name == "ModelActor":
        from .model_actor import ModelActor

        return ModelActor
    if name == "ensure_ray":
        from .ray_init import ensure_ray

        return ensure_ray
    raise AttributeError(name)


__all__ = [
    "ModelHandle",
    "ModelActor",
    "ActorDied",
    "EngineFailed",
    "LoadFailed",
    "UnloadError",
    "ensure_ray",
    "is_permanent",
]
