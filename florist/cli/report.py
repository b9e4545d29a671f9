"""``florist report``: report.md and plots from one or more run directories."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from .app import app
from .errors import user_errors

console = Console()


@app.command("report")
def report_command(
    run_dirs: list[Path] = typer.Argument(..., help="run directories (each holds metrics.jsonl)", show_default=False),
    output: Path = typer.Option(
        None, "--output", "-o", help="folder for report.md and plots/ (default: the first run directory)"
    ),
    title: str = typer.Option(None, help="the report's heading"),
    plots: bool = typer.Option(True, help="render the PNG plots (--no-plots: tables only, much faster)"),
) -> None:
    """Results table in the paper's layout, quality against download, swept methods' ranks and spectra, rounds."""
    from ..report import ReportError, write_report

    with user_errors(ReportError):
        path = write_report(run_dirs, output, title, plots)
    plots_line = f" (plots in {path.parent / 'plots'})" if plots else ""
    console.print(f"report: {path}{plots_line}", markup=False, highlight=False, soft_wrap=True)
