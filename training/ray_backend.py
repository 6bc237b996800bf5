"""Ray Train's torch backend plus one step: each worker's SIGTERM becomes a stop-at-step-boundary.

Ray runs the training function in a thread of the worker actor; ``signal.signal`` only works on
the process's main thread, which is where the actor's own methods (``execute``) run. The backend's
``on_training_start`` hook runs there on every worker, before the training function starts, and
after every worker-group restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from training.preempt import install_worker_handler

__all__ = ["PreemptibleTorchConfig"]


class _PreemptibleBackend(_TorchBackend):
    def on_training_start(self, worker_group: Any, backend_config: Any) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(install_worker_handler)  # on each actor's main thread


@dataclass
class PreemptibleTorchConfig(TorchConfig):
    """``TorchConfig`` whose workers checkpoint and stop on SIGTERM instead of exiting at once."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _PreemptibleBackend
