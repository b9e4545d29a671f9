"""The ``florist`` command line: thin over the library. Each command lives in its own module."""

from __future__ import annotations

import sys
import warnings

# typer 0.20 imports two click helpers that click 8.2 deprecates, a DeprecationWarning on every start under
# PYTHONWARNINGS=default; the import is typer's (later typer releases carry their own click), not florist's. The
# filter is set here, in the package, before any command module imports typer.
warnings.filterwarnings(
    "ignore",
    message=r"'click\.utils\.get_(binary|text)_stream' is deprecated",
    category=DeprecationWarning,
    module="typer",
)

# Each module registers its command(s) on `app` when imported (one line per module, keep sorted).
from . import aggregate as _aggregate  # noqa: E402,F401
from . import data as _data  # noqa: E402,F401
from . import demo as _demo  # noqa: E402,F401
from . import eval as _eval  # noqa: E402,F401
from . import methods as _methods  # noqa: E402,F401
from . import report as _report  # noqa: E402,F401
from . import run as _run  # noqa: E402,F401
from .app import app  # noqa: E402


def main() -> None:
    from florist.threads import ThreadsError, thread_count

    try:
        thread_count()  # a bad FLORIST_THREADS is refused before any command starts work
    except ThreadsError as e:
        print(f"florist: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    app()
