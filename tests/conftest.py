"""Session-scoped fixtures shared by every test layer.

One local Ray instance serves all integration tests; corpora, tokenizers and prepared datasets are built
once per session and reused.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session (4 logical CPUs on a 2-core box)."""
    import ray

    from cluster.ray_env import WORKER_ENV

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            runtime_env={"env_vars": dict(WORKER_ENV)},
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()
