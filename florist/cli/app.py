"""The ``florist`` Typer application that every command module registers its command(s) on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="florist",
    help="Federated LoRA fine-tuning of LLMs: FLoRIST and its baselines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
