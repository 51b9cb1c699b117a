"""Typed errors with messages a user can act on."""

from deqguard.errors import DeqguardError

__all__ = ["CheckpointError", "DeqguardError", "InputError"]


class CheckpointError(DeqguardError):
    """A checkpoint is missing, unreadable, tampered with, or does not match its model."""


class InputError(DeqguardError, ValueError):
    """An input tensor or image does not fit the model (shape, dtype, range, NaN)."""
