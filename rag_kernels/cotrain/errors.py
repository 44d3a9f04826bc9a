"""Errors the user can fix (a bad option, a missing or malformed file, a refused checkpoint).

The command line prints a :class:`UserError` as ONE line ``rag-kernels: error: <message>``
on stderr and exits 2 (``--debug`` adds the traceback); any other exception is a bug and
keeps its traceback. ``UserError`` subclasses ``ValueError`` so library callers that catch
``ValueError`` (bad configuration, malformed data) keep working.

Stdlib only: the CLI imports this before validating options, i.e. before anything heavy.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["ArgumentParser", "UserError", "one_line", "warn"]


class UserError(ValueError):
    """A problem with what the user gave (options, files, the output directory)."""


def one_line(exc_or_text: BaseException | str) -> str:
    """The text of an exception (or a string) on one line: newlines become ``" | "``;
    an exception with no message gives its type name."""
    text = str(exc_or_text).strip()
    if not text and isinstance(exc_or_text, BaseException):
        text = type(exc_or_text).__name__
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def warn(message: str) -> None:
    """A one-line warning on stderr (``rag-kernels: warning: ...``)."""
    print(f"rag-kernels: warning: {one_line(message)}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise a UserError (one line at the CLI) instead of printing the
    usage and exiting 2; ``--help`` still prints the help and exits 0."""

    def error(self, message: str):
        raise UserError(message)
