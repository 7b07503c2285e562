"""One place that starts or joins Ray for modelyard (handles, pipeline, orchestration).

A Ray started here (no address) listens on loopback only, has no dashboard unless asked, and
keeps Ray's token authentication on: anyone who can reach a Ray port can run code as this user,
so an unauthenticated cluster on a shared machine is a remote-code-execution hole.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import sys

LOOPBACK = "127.0.0.1"
_AUTH_ENV = "RAY_AUTH_MODE"


def ensure_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool = False,
    log_to_driver: bool = True,
    namespace: str | None = "modelyard",
    runtime_env: dict | None = None,
    allow_unauthenticated: bool = False,
    **init_kwargs,
) -> dict:
    """Initialize Ray unless it already is; returns {"started", "address", "node_ip", "node_id", "auth"}.

    address=None and no RAY_ADDRESS: start a local cluster bound to 127.0.0.1 with token
    authentication (Ray generates ~/.ray/auth_token if missing). RAY_AUTH_MODE=disabled in the
    environment is refused unless `allow_unauthenticated=True`.

    address given (or RAY_ADDRESS): join that cluster with token authentication. Ray's client
    sends a token to an explicit address only when RAY_AUTH_MODE=token, and a token cluster
    refuses it otherwise ("InvalidAuthToken"); so when RAY_AUTH_MODE is unset it is set to
    "token" in this process's environment (as Ray does for a cluster it starts itself). A value
    the user set is kept: RAY_AUTH_MODE=disabled joins a cluster without authentication. The
    token is found as for any Ray client: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.

    Joining a local cluster by address: on Linux, ray.init rewrites a loopback host
    ("127.0.0.1:<port>", "localhost:<port>") to the machine's outbound IP before connecting.
    A cluster started by this function listens on 127.0.0.1 only and would refuse the rewritten
    address, so for a loopback address the rewrite is suspended during the join (as when
    starting). Hence, on the same machine:
    - a cluster started by ensure_ray() in another process can be joined with
      ensure_ray(address=<its info["address"]>), but not with a plain ray.init(address=...) nor
      from another machine (by design: it is loopback-only);
    - a `ray start --head [--node-ip-address 127.0.0.1]` cluster (Ray rewrote its node IP to the
      outbound one and its GCS listens on every interface) can be joined by "127.0.0.1:<port>"
      or by the address `ray start` printed, here and with ray.init.

    Extra keyword arguments go to ray.init (object_store_memory, _temp_dir, ...).
    """
    import ray

    if ray.is_initialized():
        return _describe(started=False)
    joining = address is not None or bool(os.environ.get("RAY_ADDRESS"))
    kw = dict(init_kwargs)
    if not joining:
        mode = os.environ.get(_AUTH_ENV)
        if mode is not None and mode.lower() != "token" and not allow_unauthenticated:
            raise RuntimeError(
                f"{_AUTH_ENV}={mode!r} would start a Ray cluster without token authentication; unset it "
                f"(modelyard keeps token auth on) or pass allow_unauthenticated=True"
            )
        # mode unset: Ray (>= 2.5x) turns token auth on for a new local cluster itself and
        # writes ~/.ray/auth_token if missing; the result is checked after ray.init below.
        kw.setdefault("_node_ip_address", LOOPBACK)
        kw.setdefault("dashboard_host", LOOPBACK)
        kw["include_dashboard"] = include_dashboard
        if num_cpus is not None:
            kw["num_cpus"] = num_cpus
        if num_gpus is not None:
            kw["num_gpus"] = num_gpus
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # actor log lines into a file: no colour codes
    if joining:
        if os.environ.get(_AUTH_ENV) is None:
            _enable_token_auth_for_client()
        loopback = _is_loopback(address or os.environ.get("RAY_ADDRESS"))
        with _loopback_node_ip() if loopback else contextlib.nullcontext():
            ray.init(address=address, namespace=namespace, runtime_env=runtime_env, log_to_driver=log_to_driver, **kw)
    else:
        with _loopback_node_ip(), _quiet_local_start():
            ray.init(namespace=namespace, runtime_env=runtime_env, log_to_driver=log_to_driver, **kw)
    info = _describe(started=not joining)
    if not joining and info["node_ip"] not in (LOOPBACK, "::1"):
        ray.shutdown()
        raise RuntimeError(f"Ray started on {info['node_ip']} instead of loopback; refusing to run")
    if not joining and info["auth"] != "token" and not allow_unauthenticated:
        ray.shutdown()
        raise RuntimeError(f"Ray started without token authentication (mode {info['auth']!r}); refusing to run")
    return info


def _enable_token_auth_for_client() -> None:
    """RAY_AUTH_MODE=token for this process and its children, and for Ray's config here, which
    was read from the environment when Ray was imported and is re-read only on request."""
    from ray._raylet import Config

    os.environ[_AUTH_ENV] = "token"
    Config.initialize("")


def _is_loopback(address: str | None) -> bool:
    """True for "127.0.0.1:6379", "localhost:6379", "[::1]:6379"; False for "auto" and ray://."""
    if not address or "://" in address or ":" not in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _loopback_node_ip():
    """Make ray.init keep 127.0.0.1 as the node IP (and a loopback address to join as given)
    for the duration of the call.

    Ray on Linux rewrites a loopback `_node_ip_address` or cluster address to the machine's
    outbound IP (so that other nodes could join), and the servers of a cluster it starts then
    listen on every interface. Its only switch is the single-node mode it uses on macOS/Windows
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), which is read into a module constant at import; it
    is flipped for this call only and restored. The GCS, raylet and workers of a cluster started
    here then bind 127.0.0.1 (the caller checks the result).
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


class _DropLocalStartNoise(logging.Filter):
    """Ray's two records on every local start that tell a modelyard user nothing: the token-auth
    notice (ensure_ray keeps token auth on and checks it after init) and the bare start banner
    (with a dashboard, the banner carries its URL and still shows)."""

    TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster."
    BANNER = "Started a local Ray instance."
    LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray._private.worker")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith(self.TOKEN_NOTICE) or msg == self.BANNER)


@contextlib.contextmanager
def _quiet_local_start():
    """Filter exactly those records while ray.init starts a local cluster; every other record of
    these loggers (errors, other warnings) goes through, and nothing is filtered afterwards."""
    f = _DropLocalStartNoise()
    for name in f.LOGGERS:
        logging.getLogger(name).addFilter(f)
    try:
        yield
    finally:
        for name in f.LOGGERS:
            logging.getLogger(name).removeFilter(f)


def _describe(started: bool) -> dict:
    import ray

    ctx = ray.get_runtime_context()
    node = ray._private.worker.global_worker.node_ip_address
    return {
        "started": started,
        "address": ctx.gcs_address,
        "node_ip": node,
        "node_id": ctx.get_node_id(),
        "auth": auth_mode(),
    }


def auth_mode() -> str:
    """Ray's authentication mode in this process: "token", "disabled", or "unknown"."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:  # Ray without token auth support
        return "unknown"
    mode = get_authentication_mode()
    return (
        "token"
        if mode == AuthenticationMode.TOKEN
        else ("disabled" if mode == AuthenticationMode.DISABLED else str(mode))
    )
