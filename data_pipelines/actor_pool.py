"""Ray Data actor pools: the one place that knows how Ray 2.60 takes an actor's ``max_restarts``."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["restarts_as_remote_arg"]


@contextlib.contextmanager
def restarts_as_remote_arg() -> Iterator[None]:
    """Around ``map_batches(..., max_restarts=N)`` with an actor pool.

    Ray 2.60 takes ``max_restarts`` as a plain remote argument (deprecated there, with no named one
    yet), and Ray Data's default (-1) prints ray#53727's warning for every actor it starts; raylm
    passes it explicitly and keeps the deprecation notice off the user's console.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield
