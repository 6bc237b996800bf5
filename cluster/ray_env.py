"""Connecting to Ray: join a running cluster (inside `ray job submit`, or `ray.address` set), else
start a local single-node instance with more logical CPUs than cores so actor pools never starve
read tasks (seen: a pool holding every logical CPU stalls Ray Data forever)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from cluster.config import RayConfig

__all__ = ["ray_session", "local_num_cpus", "WORKER_ENV"]

# Set in every Ray worker. Tokenizers' own thread pool fights Ray's processes for cores and grows
# memory inside forked workers (levanter#568).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def local_num_cpus(requested: int | None = None) -> int:
    if requested is not None:
        return requested
    return max(4, 2 * (os.cpu_count() or 1))


def _cluster_address(cfg: RayConfig) -> str | None:
    if cfg.address:
        return cfg.address
    # Inside `ray job submit` Ray sets RAY_ADDRESS; a user may export it too.
    return os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Use the Ray instance already initialised in this process, else join or start one.

    Only an instance this function started is shut down on exit.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.update(WORKER_ENV)
    address = _cluster_address(cfg)
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=local_num_cpus(cfg.num_cpus),
            runtime_env=runtime_env,
            include_dashboard=False,
        )
    try:
        yield
    finally:
        ray.shutdown()
