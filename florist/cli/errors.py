"""One-line errors for the command line: known failures print ``florist: <what and where>`` and exit 2."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import typer

from ..files import WriteError


class UserError(Exception):
    """A failure caused by the user's input; the message names what is wrong and where."""


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn ``UserError``, ``WriteError`` (a full disk, no permission: every command writes through the same helpers)
    and the given exception types into a one-line message and exit code 2."""
    if threading.current_thread() is threading.main_thread():
        # Past a file-size limit (ulimit -f) the system kills the process with SIGXFSZ; ignored, the write fails
        # with EFBIG instead, and becomes a WriteError like a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    except (UserError, WriteError, *kinds) as e:
        print(f"florist: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
