"""The ``florist`` command line: thin over the library. Each command lives in its own module."""

from __future__ import annotations

import warnings

# typer 0.20 imports two click helpers that click 8.2 deprecates, a DeprecationWarning on every start under
# PYTHONWARNINGS=default; the import is typer's (later typer releases carry their own click), not florist's.
warnings.filterwarnings(
    "ignore",
    message=r"'click\.utils\.get_(binary|text)_stream' is deprecated",
    category=DeprecationWarning,
    module="typer",
)

import typer  # noqa: E402

app = typer.Typer(
    name="florist",
    help="Federated LoRA fine-tuning of LLMs: FLoRIST and its baselines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module registers its command(s) on `app` when imported (one line per module, keep sorted).
from . import aggregate as _aggregate  # noqa: E402,F401
from . import data as _data  # noqa: E402,F401
from . import demo as _demo  # noqa: E402,F401
from . import eval as _eval  # noqa: E402,F401
from . import report as _report  # noqa: E402,F401
from . import run as _run  # noqa: E402,F401


def main() -> None:
    app()
