"""``florist data ...``: look at instruction data and how it splits over clients."""

from __future__ import annotations

import typer
from rich.console import Console

from .app import app
from .errors import UserError, user_errors

data_app = typer.Typer(help="Inspect instruction data and its split over clients.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("summary")
def summary(
    data: str = typer.Option(
        "builtin",
        "--data",
        help="builtin, a JSON/JSONL/Parquet/CSV file, a folder of client_K.json files, dolly, alpaca, wizard "
        "or a hub id",
    ),
    clients: int | None = typer.Option(
        None, "--clients", help="number of clients [default: 8; for a client folder: its files]"
    ),
    scheme: str = typer.Option("dirichlet", "--partition", help="iid, dirichlet or shards"),
    alpha: float = typer.Option(0.5, "--alpha", help="Dirichlet concentration: smaller is more non-IID"),
    seed: int = typer.Option(0, "--seed"),
    column: str = typer.Option("category", "--column", help="the column the non-IID split follows"),
    resplit: bool = typer.Option(False, "--resplit", help="a client folder: pool its files and split them anew"),
) -> None:
    """Print each client's size and category mix (a folder of client files is shown as it is, unless --resplit)."""
    from florist.data import SCHEMES, DataError, is_client_folder, load_clients, summary_table

    with user_errors(DataError):
        if scheme not in SCHEMES:
            raise UserError(f"--partition {scheme!r}: choose from {', '.join(SCHEMES)}")
        split = load_clients(data, clients, scheme, alpha, seed, column, resplit=resplit)
        how = (
            "as split in its files"
            if is_client_folder(data) and not resplit
            else f"{scheme}" + (f", alpha {alpha}" if scheme == "dirichlet" else "") + f", seed {seed}"
        )
        console = Console()
        console.print(summary_table(split, column, title=f"{data}: {len(split)} clients ({how})", width=console.width))
