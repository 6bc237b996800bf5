"""Errors the training stage raises; each message names the config key, step or rank at fault."""

__all__ = ["CheckpointError", "NonFiniteError", "TrainConfigError"]


class TrainConfigError(ValueError):
    """A training config that cannot run (checked on the driver before any worker starts)."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with ``train.nonfinite: stop``; names the step and rank(s)."""


class CheckpointError(RuntimeError):
    """A checkpoint that fails its integrity check or does not match the current run."""
