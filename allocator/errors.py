"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class BitallocError(Exception):
    """Bad input or an unusable environment, explained in one line for the user."""
