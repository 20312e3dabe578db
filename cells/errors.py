"""User-facing errors: what a person can fix (a path, a flag, a busy port), told in one line."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or a bad setting; commands print it as one line and exit 1 (`--debug` shows the traceback)."""


class BadInput(UserError, ValueError):
    """An argument, file or setting that cannot be used as given."""


class MissingInput(UserError, FileNotFoundError):
    """A path that was named does not exist."""


def first_line(text: object, limit: int = 200) -> str:
    """The first non-empty line of `text`, cut to `limit` characters: for error rows and one-line messages."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


def describe(error: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, for errors whose type is part of the explanation."""
    return first_line(f"{type(error).__name__}: {error}", limit)
