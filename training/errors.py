"""Errors the training stage raises; each message names the config key, step or rank at fault."""

__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "Preempted",
    "RunLockedError",
    "TrainConfigError",
]


class TrainConfigError(ValueError):
    """A training config that cannot run (checked on the driver before any worker starts)."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with ``train.nonfinite: stop``; names the step and rank(s)."""


class CheckpointError(RuntimeError):
    """A checkpoint that fails its integrity check or does not match the current run."""


class RunLockedError(RuntimeError):
    """Another live ``raylm train`` holds the run dir's lock; names the run dir and the holder."""


class Preempted(RuntimeError):
    """The run stopped early on SIGTERM after writing a checkpoint; re-running resumes it."""

    def __init__(self, step: int, reason: str = "SIGTERM") -> None:
        super().__init__(f"preempted at step {step} ({reason}); re-run the same command to resume")
        self.step, self.reason = step, reason
