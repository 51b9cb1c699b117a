"""The root of deqguard's intentional errors, importable without torch (the client needs it)."""


class DeqguardError(Exception):
    """Base class of the errors deqguard raises on purpose: the CLI prints them, exit code 2."""
