"""The error type for a user's mistake: the commands print it as one line ``error: ...`` (exit code 2).

A leaf module, so libraries (``pipeline``, ``eval``, ``curation``) can raise it without importing
the command-line prologue (``cli.py``, which defines flags).
"""


class UserError(ValueError):
    """A mistake in what the user asked for (a missing file, a bad flag value): reported without a traceback."""


class GenerateError(UserError):
    """A bad input of a generation request (``pipeline/request.py``, ``pipeline/media.py``)."""
