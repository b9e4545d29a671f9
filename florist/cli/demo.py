"""``florist demo``: every aggregation rule side by side on generated adapters with a real model's shapes."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

from ..aggregation import AggregationResult, prepare
from ..aggregation.metrics import relative_error
from ..aggregation.stacking import stack
from ..communication import round_communication
from ..methods import Method, format_value, in_order
from ..synthetic import MODEL_SHAPES, PAPER_HETEROGENEOUS_RANKS, frozen_a_updates, module_shapes, synthetic_updates
from ..tables import TableColumn, fitted_table
from .app import app
from .errors import UserError, user_errors

console = Console()


@app.command("demo")
def demo(
    model: str = typer.Option("tinyllama", help=f"whose q_proj/v_proj shapes to use: {', '.join(MODEL_SHAPES)}"),
    layers: int = typer.Option(2, help="how many layers to generate (FlexLoRA's dense SVD costs seconds per module)"),
    thresholds: str = typer.Option(
        "0.8,0.9,0.95,1.0",
        "--thresholds",
        "--values",
        help="The values of each swept parameter (FLoRIST's τ), comma-separated",
    ),
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
        values = swept_values(thresholds)
        shapes = dict(list(module_shapes(model).items())[: 2 * layers])
        for label, ranks in (("homogeneous, r=16", [16] * 8), ("heterogeneous", list(PAPER_HETEROGENEOUS_RANKS))):
            console.print(f"\n[bold]{model}[/], {len(shapes)} modules, 8 clients, {label}: ranks {ranks}")
            console.print(comparison_table(synthetic_updates(shapes, ranks, seed=seed), values))
    console.print(
        "\nA method with per-client adapters shows its largest-rank client's; clients under a shared frozen A "
        "learn B only, and their error is against their own exact update."
    )
    console.print(
        "Error: ||ΔW_method - ΔW||_F / ||ΔW||_F, mean over modules (ΔW = Σ w_k s_k B_k A_k, computed from factors)."
    )


def swept_values(spec: str) -> dict[str, list[float]]:
    """Each swept method's values from ``--thresholds``, read by the method's own parser."""
    out = {}
    for method in in_order():
        if method.sweep is not None:
            values, problem = method.sweep.parse(spec)
            if problem:
                raise UserError(f"--thresholds {spec!r}: {method.name}'s {method.sweep.name} {problem}")
            out[method.name] = values
    return out


def comparison_table(updates, values: dict[str, list[float]]) -> Table:
    """One row per method (per value for a swept one); a method sharing a frozen A gets the same clients under one."""
    prepared, weights = prepare(updates)
    frozen, _ = prepare(frozen_a_updates(updates))
    exact = _exact_updates(prepared, weights)
    exact_frozen = _exact_updates(frozen, weights)
    swept = next((m.sweep.name for m in in_order() if m.sweep), "value")
    headers = ["method", swept, "rank min/mean/max", "error", "up (MB)", "down (MB)", "Eff ×10⁻⁴", "server (s)"]
    rows = []
    for method in in_order():
        mode = method.mode(1)
        if mode.core or mode.keeps or mode.shared - {"A"}:
            continue  # generated clients train A and B; only a shared frozen A is derived from them
        shared_a = "A" in mode.shared
        clients, reference = (frozen, exact_frozen) if shared_a else (prepared, exact)
        for value, (result, seconds) in _timed_runs(method, clients, weights, values.get(method.name)).items():
            comm = round_communication(method, 1, clients, result)
            ranks = [m.rank for m in result.modules.values()]
            errors = [relative_error((m.B, m.A), reference[mod]) for mod, m in result.modules.items()]
            rows.append(
                [
                    method.name,
                    "" if value is None else format_value(value),
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


def _timed_runs(
    method: Method, prepared, weights, values: list[float] | None
) -> dict[float | None, tuple[AggregationResult, float]]:
    """Each value's result and its share of the server's seconds (a sweep shares one decomposition)."""
    values = values or [None]
    start = time.perf_counter()
    results = method.aggregate_sweep(prepared, weights, values)
    each = (time.perf_counter() - start) / len(values)
    return {value: (r, each) for value, r in results.items()}
