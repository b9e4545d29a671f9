"""One-line errors for the command line: known failures print ``florist: <what and where>`` and exit 2."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer


class UserError(Exception):
    """A failure caused by the user's input; the message names what is wrong and where."""


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn ``UserError`` (and the given exception types) into a one-line message and exit code 2."""
    try:
        yield
    except (UserError, *kinds) as e:
        print(f"florist: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
