"""Checks a job passes before anything starts (no Ray, no model load): each one turns a mistake
that would otherwise surface minutes later, or as a job that 'succeeds' on nothing, into one
clear line. Every check here is cheap: a stat, one directory listing, one TCP connect."""

from __future__ import annotations

import socket

from ..spec.hub import check_local
from ..spec.inputs import require_items
from ..spec.job import JobSpec
from ..spec.validation import SpecError


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """A --address that cannot work: a dashboard URL, or a host:port nobody listens on.

    Ray itself retries an unreachable GCS for minutes, printing warnings; one TCP connect tells
    the user at once. "auto" and ray:// client addresses are left to Ray.
    """
    if not address or address == "auto" or address.startswith("ray://"):
        return
    if address.startswith(("http://", "https://")):
        raise SpecError(
            f"--address {address!r} is a dashboard URL (what `ray job submit --address` takes); "
            "give the cluster's GCS address instead, host:port as `ray start --head` prints it "
            "(default port 6379), or 'auto' on a cluster node"
        )
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SpecError(f"--address {address!r} must look like host:port (e.g. 10.0.0.1:6379) or be 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise SpecError(
            f"no Ray cluster answers at {address} ({why}); start one there with `ray start --head`, "
            "or leave out --address to run on a local one"
        ) from e


def check_job(job: JobSpec, address: str | None = None) -> None:
    """SpecError for a model path that is not a checkpoint, inputs with no images, or an
    unreachable --address. RAY_ADDRESS is Ray's to check (`ray job submit` sets it for the driver)."""
    for m in job.models:
        check_local(m.path)
    require_items(job.inputs)
    check_address(address)
