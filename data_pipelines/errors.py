"""Errors the data stage raises for bad input; the message names the file, line or key."""

__all__ = ["DataError"]


class DataError(ValueError):
    """Input that cannot be used: a missing path, no documents, or a bad record in strict mode."""
