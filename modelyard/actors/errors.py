"""Errors raised by model actors and their handles."""

from __future__ import annotations


class ActorDied(RuntimeError):
    """The model actor's process is gone (crash, OOM kill, SIGKILL, killed by someone else).

    `request_ids`: the requests of the failed call that did not complete, in submission order.
    `completed`: {request_id: Output} for requests of the same call that finished before the
    death, so a caller loses no finished work. The handle can `respawn()` afterwards.
    """

    def __init__(
        self, name: str, request_ids: list[str], completed: dict | None = None, cause: BaseException | None = None
    ):
        self.name = name
        self.request_ids = list(request_ids)
        self.completed = dict(completed or {})
        self.cause = cause
        shown = ", ".join(self.request_ids[:8]) + (" ..." if len(self.request_ids) > 8 else "")
        super().__init__(
            f"model actor {name!r} died; {len(self.request_ids)} request(s) did not complete: [{shown}]"
            + (f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})" if cause else "")
        )

    def __reduce__(self):
        return (ActorDied, (self.name, self.request_ids, self.completed, None))


class UnloadError(RuntimeError):
    """The actor was killed but the device memory did not come back within the timeout."""

    def __init__(self, name: str, result: dict):
        self.name = name
        self.result = dict(result)
        mib = lambda k: "n/a" if result.get(k) is None else f"{result[k] / (1 << 20):.1f} MiB"  # noqa: E731
        super().__init__(
            f"unload of {name!r}: not verified after {result.get('seconds', 0.0):.2f}s: "
            f"residual {mib('residual_bytes')} over baseline, reclaimed {mib('reclaimed_bytes')}, "
            f"actor process still present: {result.get('process_still_listed')}; {result.get('note', '')}"
        )


class EngineFailed(RuntimeError):
    """The engine inside the actor raised during a step; the actor refuses further work (respawn it)."""


# Failures a rerun of the same job cannot fix: the checkpoint, the install or an option is wrong.
_PERMANENT = (
    ImportError,
    LookupError,
    ValueError,
    TypeError,
    NotImplementedError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
_PERMANENT_NAMES = {"SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeader"}


def is_permanent(exc: BaseException | None) -> bool:
    """Whether a load failure will recur on a rerun unchanged (unsupported architecture, a missing
    package, an unreadable checkpoint, a bad option), as opposed to one that may not (out of
    memory, a timeout, a killed process)."""
    return isinstance(exc, _PERMANENT) or type(exc).__name__ in _PERMANENT_NAMES


class LoadFailed(RuntimeError):
    """Spawning a model actor failed; `permanent` says whether a rerun can help (see is_permanent)."""

    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent

    def __reduce__(self):
        return (LoadFailed, (str(self), self.permanent))
