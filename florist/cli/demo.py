"""``florist demo``: every aggregation rule side by side on generated adapters with a real model's shapes."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

from ..aggregation import METHODS, AggregationResult, get_method, prepare, sweep
from ..aggregation.metrics import relative_error
from ..aggregation.stacking import stack
from ..communication import round_communication
from ..config import parse_thresholds
from ..results import TableColumn, fitted_table, format_tau
from ..synthetic import MODEL_SHAPES, PAPER_HETEROGENEOUS_RANKS, frozen_a_updates, module_shapes, synthetic_updates
from . import app
from .errors import UserError, user_errors

console = Console()


@app.command("demo")
def demo(
    model: str = typer.Option("tinyllama", help=f"whose q_proj/v_proj shapes to use: {', '.join(MODEL_SHAPES)}"),
    layers: int = typer.Option(2, help="how many layers to generate (FlexLoRA's dense SVD costs seconds per module)"),
    thresholds: str = typer.Option("0.8,0.9,0.95,1.0", help="FLoRIST thresholds tau, comma-separated"),
    seed: int = typer.Option(0),
) -> None:
    """Aggregate generated client adapters with every method: ranks, error against the exact update, traffic."""
    with user_errors(ValueError):
        if model not in MODEL_SHAPES:
            raise UserError(f"--model {model!r}: choose from {', '.join(MODEL_SHAPES)}")
        depth = MODEL_SHAPES[model][0]
        if not 1 <= layers <= depth:
            raise UserError(f"--layers {layers}: choose 1 to {depth} ({model} has {depth} layers)")
        if not 0 <= seed < 2**64:
            raise UserError(f"--seed {seed}: expected 0 to 2^64 - 1")
        taus = parse_thresholds(thresholds, where="--thresholds")
        shapes = dict(list(module_shapes(model).items())[: 2 * layers])
        for label, ranks in (("homogeneous, r=16", [16] * 8), ("heterogeneous", list(PAPER_HETEROGENEOUS_RANKS))):
            console.print(f"\n[bold]{model}[/], {len(shapes)} modules, 8 clients, {label}: ranks {ranks}")
            console.print(comparison_table(synthetic_updates(shapes, ranks, seed=seed), taus))
    console.print(
        "\nFlexLoRA's row is its largest-rank client's adapter; FFA-LoRA's clients learn B only, under a frozen A, "
        "and its error is against their own exact update."
    )
    console.print(
        "Error: ||ΔW_method - ΔW||_F / ||ΔW||_F, mean over modules (ΔW = Σ w_k s_k B_k A_k, computed from factors)."
    )


def comparison_table(updates, taus: list[float]) -> Table:
    """One row per method (per tau for FLoRIST); FFA-LoRA gets the same clients with A frozen."""
    prepared, weights = prepare(updates)
    frozen, _ = prepare(frozen_a_updates(updates))
    exact = _exact_updates(prepared, weights)
    exact_frozen = _exact_updates(frozen, weights)
    headers = ["method", "τ", "rank min/mean/max", "error", "up (MB)", "down (MB)", "Eff ×10⁻⁴", "server (s)"]
    rows = []
    for name in METHODS:
        method = get_method(name)
        clients = frozen if name == "ffa" else prepared
        for tau, (result, seconds) in _timed_runs(name, method, clients, weights, taus).items():
            comm = round_communication(method, clients, result)
            ranks = [m.rank for m in result.modules.values()]
            reference = exact_frozen if name == "ffa" else exact
            errors = [relative_error((m.B, m.A), reference[mod]) for mod, m in result.modules.items()]
            rows.append(
                [
                    name,
                    "" if tau is None else format_tau(tau),
                    f"{min(ranks)}/{sum(ranks) / len(ranks):.1f}/{max(ranks)}",
                    f"{sum(errors) / len(errors):.3f}",
                    f"{sum(comm.upload_bytes) / 1e6:.1f}",
                    f"{sum(comm.download_bytes) / 1e6:.1f}",
                    f"{comm.eff * 1e4:.2f}",
                    f"{seconds:.2f}",
                ]
            )
    columns = [TableColumn(h, justify="left" if h == "method" else "right") for h in headers]
    # on a narrow terminal the server's seconds go first, then Eff (the traffic columns hold it too)
    return fitted_table(columns, rows, console.width, drop=[[7], [6]])


def _exact_updates(clients, weights):
    """Per module, the exact update as a factor pair (the FLoRA stack)."""
    return {name: stack([u.modules[name] for u in clients], weights) for name in clients[0].modules}


def _timed_runs(name, method, prepared, weights, taus) -> dict[float | None, tuple[AggregationResult, float]]:
    start = time.perf_counter()
    if name == "florist":
        results = sweep(prepared, weights, taus)
        per_tau = (time.perf_counter() - start) / len(taus)
        return {tau: (r, per_tau) for tau, r in results.items()}
    result = method.aggregate(prepared, weights)
    return {None: (result, time.perf_counter() - start)}
