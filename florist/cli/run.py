"""``florist run``: a federated fine-tuning run from a TOML config, with command-line overrides."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from .app import app
from .errors import user_errors

console = Console()


@app.command("run")
def run_command(
    config: Path = typer.Argument(None, help="TOML config (defaults: the embedded model on the built-in dataset)"),
    set_: list[str] = typer.Option([], "--set", help="override a config key: section.key=value (repeatable)"),
    methods: str = typer.Option(None, help="comma-separated: florist,flora,fedit,flexlora,ffa"),
    thresholds: str = typer.Option(None, help="FLoRIST tau: 0.9, 0.8,0.9 or a range 0.80:1.00:0.01"),
    rounds: int = typer.Option(None, help="communication rounds"),
    model: str = typer.Option(None, help="model alias, hub id or local directory"),
    data: str = typer.Option(
        None, help="training data: builtin, a hub id, a JSON/JSONL file or a folder of client files"
    ),
    output: str = typer.Option(None, help="run directory (resumed if it holds an unfinished run of the same config)"),
    engine: str = typer.Option(
        None, help="inprocess (default) or flower: Flower's simulation engine, a SuperNode per client"
    ),
    overwrite: bool = typer.Option(False, help="start afresh even if the run directory holds another run"),
    quiet: bool = typer.Option(False, help="print nothing but errors and the results table"),
) -> None:
    """Train clients, aggregate with every method, evaluate, and write the paper-style results table."""
    from ..config import ConfigError, load_config

    # strings are quoted as TOML strings (JSON's quoting is TOML's), so a path with " or \ stays that path, and ""
    # reaches the checks (refused) instead of meaning the default
    shortcuts = {
        "federation.methods": methods and _list(methods),
        "federation.thresholds": thresholds,
        "federation.rounds": rounds,
        "model.name": model,
        "data.train": data,
        "output": output,
        "engine": engine,
    }
    overrides = list(set_) + [
        f"{k}={v if isinstance(v, int) else json.dumps(v)}" for k, v in shortcuts.items() if v is not None
    ]
    with user_errors(ConfigError):  # before torch and transformers are imported: a mistake is told in a second
        cfg = load_config(config, overrides)
    from ..adapters import AdapterError
    from ..data import DataError
    from ..evaluation import EvalDataError
    from ..models import ModelLoadError
    from ..results import terminal_table
    from ..run import run
    from ..rundir import RunDirectory, RunDirError
    from ..server import RoundFailed
    from ..setup import results

    errors = (ConfigError, DataError, EvalDataError, ModelLoadError, RunDirError, AdapterError, RoundFailed)
    with user_errors(*errors):
        path = run(cfg, overwrite=overwrite, progress=not quiet, log=_silent if quiet else None)
        table, base_accuracy = results(RunDirectory(path, base_model=None), cfg)
    base = "" if base_accuracy is None else f"base model (round 0): accuracy {100 * base_accuracy:.2f}%; "
    caption = f"{base}every column: {path / 'results.md'}"
    console.print(terminal_table(table, console.width, title=f"Results: {path}", caption=caption))


def _silent(message: str) -> None:
    """--quiet: the run's messages are not printed (metrics.jsonl records what happened, left-out clients too)."""


def _list(csv: str) -> list[str]:
    return [x.strip() for x in csv.split(",") if x.strip()]
