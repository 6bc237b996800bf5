"""Connecting to Ray: join a running cluster (inside `ray job submit`, `ray.address` / `RAY_ADDRESS`
set, or a `ray start` cluster on this machine), else start a local single-node instance with more
logical CPUs than cores so actor pools never starve read tasks (seen: a pool holding every logical CPU
stalls Ray Data forever).

Token authentication (on by default for Ray 2.60 clusters) needs nothing here: Ray reads
``RAY_AUTH_MODE`` and the token (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token``)
from the environment, and jobs inherit both from the node they run on. raylm never reads, prints or
writes the token."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, RayConfig
from cluster.logs import console_logs

__all__ = ["ray_session", "cluster_address", "local_num_cpus", "WORKER_ENV"]

# Set in every Ray worker. Tokenizers' own thread pool fights Ray's processes for cores and grows
# memory inside forked workers (levanter#568).
#
# Serve's proxy must answer its readiness check within 5 s by default; on a loaded 2-core machine
# (Ray Train workers still exiting) it misses that, is killed and `serve.start` fails. Seen in
# the quickstart; 30 s costs nothing where the proxy is quick.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
}


# A local instance only: Ray Train's controller polls its workers every 2 s by default, so each
# finished run idled up to one poll (2 s) before its workers shut down; the quickstart's three
# training stages lost ~6 s that way. Polling two local workers 4 times a second costs nothing.
LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def local_num_cpus(requested: int | None = None) -> int:
    if requested is not None:
        return requested
    return max(4, 2 * (os.cpu_count() or 1))


def _check_not_dashboard(address: str, source: str) -> str:
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"{source}: {address} is a dashboard (job submission) URL; give the GCS address "
            "(HEAD:6379), or submit with `ray job submit --address " + address + " -- raylm ...`"
        )
    return address


def cluster_address(cfg: RayConfig) -> str | None:
    """The address to join (``ray.address``, then RAY_ADDRESS, then a `ray start` cluster on this
    machine), or None to start local Ray."""
    if cfg.address:
        return _check_not_dashboard(cfg.address, "ray.address")
    env = os.environ.get("RAY_ADDRESS")
    if env:
        # Inside `ray job submit` Ray sets RAY_ADDRESS to the GCS address; a user may export it too.
        # "auto" makes ray.init resolve it (and fail loudly rather than start a new instance).
        _check_not_dashboard(env, "RAY_ADDRESS")
        return "auto"
    from ray._private.services import find_bootstrap_address

    # `ray start` on this machine records its address (default temp dir); join it, as ray.init()
    # would, instead of passing local-only arguments (num_cpus) to a running cluster.
    return "auto" if find_bootstrap_address(None) else None


def _join_runtime_env() -> dict[str, Any] | None:
    """Worker env for a driver joining a cluster, minus keys the job's runtime env already sets.

    Inside `ray job submit` Ray merges the job's runtime env with ray.init's and refuses a key set in
    both (cluster/runtime_env.yaml sets TOKENIZERS_PARALLELISM too).
    """
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    extra = {k: v for k, v in WORKER_ENV.items() if k not in taken}
    return {"env_vars": extra} if extra else None


@contextlib.contextmanager
def ray_session(
    cfg: RayConfig, log_dir: str | Path | None = None, verbose: bool = False
) -> Iterator[None]:
    """Use the Ray instance already initialised in this process, else join or start one.

    Only an instance this function started is shut down on exit. With ``log_dir``, Ray's,
    DeepSpeed's and the workers' output go to ``log_dir/raylm.log`` (path printed) and the console
    keeps raylm's own lines (``cluster.logs``); ``verbose`` keeps everything on the console.

    A local instance starts Ray's dashboard on 127.0.0.1: Ray's State API lives there, and Ray
    Train's placement-group cleaner polls it every second for the whole run (without it, it warns
    each time that the State API is unavailable).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    with console_logs(log_dir, verbose) as logs:
        address = cluster_address(cfg)
        os.environ.update(WORKER_ENV)
        if address:
            ray.init(address=address, runtime_env=_join_runtime_env(), log_to_driver=True)
        else:
            for key, value in LOCAL_ENV.items():  # read by the driver at fit(): a user's wins
                os.environ.setdefault(key, value)
            ray.init(
                num_cpus=local_num_cpus(cfg.num_cpus),
                runtime_env={"env_vars": dict(WORKER_ENV)},
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                log_to_driver=True,
            )
        logs.after_ray_init()
        try:
            yield
        finally:
            ray.shutdown()
