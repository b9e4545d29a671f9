"""``florist methods``: every method florist knows, one line each, from the methods' own declarations."""

from __future__ import annotations

from rich.console import Console

from ..methods import in_order
from ..tables import TableColumn, fitted_table
from .app import app


@app.command("methods")
def methods() -> None:
    """List the methods: key, name, whether exact, what clients train and upload, and what the server does."""
    console = Console()
    rows = []
    for m in in_order():
        swept = f"; one branch per {m.sweep.name}" if m.sweep else ""
        rows.append([m.name, m.display, "yes" if m.exact else "no", m.mode(1).describe() + swept, m.summary])
    columns = [
        TableColumn("key", justify="left"),
        TableColumn("method", justify="left"),
        TableColumn("exact", justify="left"),
        TableColumn("clients (round 1)", justify="left"),
        TableColumn("server", justify="left"),
    ]
    console.print(fitted_table(columns, rows, console.width, drop=[[4], [2]]))
    settings = [(m, o) for m in in_order() for o in m.options]
    if settings:
        console.print("\nOptions, set as method.<key>.<option>=VALUE in a run's config (florist aggregate: --option):")
    for m, o in settings:
        console.print(f"  method.{m.name}.{o.name} = {o.default!r}: {o.help}", highlight=False)
    fixed_schemes = [f"{m.name} ({m.scheme})" for m in in_order() if m.scheme]
    if fixed_schemes:
        console.print(
            "\nHow the next round starts is fixed by the paper for " + ", ".join(fixed_schemes) + "; "
            "federation.scheme chooses for the others.",
            highlight=False,
        )
