"""Typed errors with messages a user can act on."""


class DeqguardError(Exception):
    """Base class of the errors deqguard raises on purpose."""


class CheckpointError(DeqguardError):
    """A checkpoint is missing, unreadable, tampered with, or does not match its model."""


class InputError(DeqguardError, ValueError):
    """An input tensor or image does not fit the model (shape, dtype, range, NaN)."""
