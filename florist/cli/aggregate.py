"""``florist aggregate``: one server round over PEFT LoRA adapter directories, written as a PEFT adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from florist.adapters import (
    RESIDUAL_NAME,
    AdapterError,
    AdapterInfo,
    check_output,
    read_adapter,
    write_adapter,
    write_adapters,
)
from florist.aggregation import AggregationError, AggregationResult, ClientUpdate
from florist.aggregation.validate import weight_values
from florist.cli.app import app
from florist.cli.errors import UserError, user_errors
from florist.communication import RoundCommunication, round_communication
from florist.config import ConfigError, override_value
from florist.methods import METHODS, Method, aggregate, format_value, get_method
from florist.progress import track
from florist.tables import TableColumn, fitted_table
from florist.threads import configure_torch

REPORT_NAME = "aggregation.json"
BYTES_PER_PARAM = 4  # adapters are written in float32


@app.command("aggregate")
def aggregate_command(
    clients: list[Path] = typer.Argument(
        ..., metavar="CLIENT_DIR", help="The clients' PEFT LoRA adapter directories, one per client."
    ),
    method: str = typer.Option(..., "--method", "-m", help=f"Aggregation rule: {', '.join(METHODS)}."),
    output: str = typer.Option(  # a str: typer would make "" the working directory, Path("")
        ...,
        "--output",
        "-o",
        metavar="OUT",
        help="Directory to write; must not exist or be empty, unless --overwrite and florist wrote it.",
    ),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        "-t",
        "--value",
        help="The method's swept parameter, for a method that has one: "
        + "; ".join(f"{m.name}: {m.sweep.help} (default {m.sweep.default:g})" for m in METHODS.values() if m.sweep)
        + ".",
    ),
    weights: str | None = typer.Option(
        None, "--weights", "-w", help="Comma-separated client weights (e.g. example counts), normalised; default equal."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUT if it exists and holds an aggregate florist wrote."
    ),
    options: list[str] = typer.Option(
        [], "--option", "-O", metavar="KEY=VALUE", help="One of the method's options (see florist methods)."
    ),
) -> None:
    """Aggregate client LoRA adapters into the global update (FlexLoRA: one adapter per client)."""
    console = Console()
    with user_errors(AdapterError, AggregationError):
        chosen = configured(get_method(method), options)  # an unknown one: AggregationError
        tau = check_value(chosen, threshold)
        client_weights = parse_weights(weights, clients)
        check_distinct(clients)
        if not output:
            raise UserError("--output is empty; name the directory to write")
        out = Path(output)
        check_output_apart(out, clients)
        check_output(out, overwrite)
        updates, infos = read_clients(clients, console)
        configure_torch()
        with console.status(f"aggregating {len(updates)} clients with {method}"):
            result = aggregate(chosen, updates, client_weights, tau)
        comm = round_communication(chosen, 1, updates, result, BYTES_PER_PARAM)
        base_model = common_value(infos, "base_model", console)
        task_type = common_value(infos, "task_type", console)
        report = aggregation_report(method, tau, client_weights, clients, result, comm)
        write_result(out, result, base_model, task_type, report, overwrite)
    print_summary(console, method, tau, clients, result, comm, out)


def configured(method: Method, options: list[str]) -> Method:
    """The method with each --option KEY=VALUE set, the value read as a config override's (a bare word is a string)."""
    values = {}
    for item in options:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option {item!r}: expected KEY=VALUE")
        try:
            values[key.strip()] = override_value(text)
        except ConfigError as e:
            raise UserError(f"--option {item!r}: {e}") from None
    try:
        return method.configured(values)
    except ValueError as e:
        raise UserError(f"--option: {e}") from None


def check_value(method: Method, value: float | None) -> float | None:
    """The swept parameter's value (its default when not given), checked by the method's own parser; refused for a
    method without one, where it would be silently ignored."""
    if method.sweep is None:
        if value is not None:
            swept = ", ".join(m.name for m in METHODS.values() if m.sweep)
            raise UserError(f"--threshold applies to methods with a swept parameter ({swept}), not {method.name}")
        return None
    value = method.sweep.default if value is None else value
    _, problem = method.sweep.parse(format_value(value) if math.isfinite(value) else str(value))
    if problem:
        raise UserError(f"--threshold {value:g}: {method.name}'s {method.sweep.name} {problem}")
    return value


def parse_weights(text: str | None, clients: list[Path]) -> list[float] | None:
    """The --weights list, one non-negative finite number per client, not all zero; None means equal weights."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    try:
        values = [float(item) for item in items]
    except ValueError:
        bad = next(item for item in items if not is_number(item))
        raise UserError(f"--weights: {bad!r} is not a number") from None
    if len(values) != len(clients):
        raise UserError(f"--weights gives {len(values)} weights for {len(clients)} clients")
    try:
        return weight_values(values, [str(c) for c in clients])
    except AggregationError as e:
        raise UserError(f"--weights: {e}") from None


def check_distinct(clients: list[Path]) -> None:
    """Each client once: a directory named twice (also through a symlink or another spelling) would count twice."""
    seen: dict[Path, Path] = {}
    for client in clients:
        resolved = client.resolve()
        if resolved in seen:
            same = "" if str(seen[resolved]) == str(client) else f" (the same directory as {seen[resolved]})"
            raise UserError(
                f"client directory {client} is given twice{same}; name each client once (--weights weighs one more)"
            )
        seen[resolved] = client


def check_output_apart(output: Path, clients: list[Path]) -> None:
    """Writing OUT must not replace a client's adapter (possible with --overwrite)."""
    out = output.resolve()
    for client in clients:
        c = client.resolve()
        if c == out or out in c.parents:
            raise UserError(f"--output {output} would replace the client directory {client}")


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_clients(clients: list[Path], console: Console) -> tuple[list[ClientUpdate], list[AdapterInfo]]:
    """Read every client adapter; the directory as given names the client in every message."""
    updates, infos = [], []
    # a bar on a terminal only: reading is quick, and a line for it would stand among the summary's
    for path in track(clients, "reading client adapters", unit="adapters", lines=False):
        modules, info = read_adapter(path, client_id=str(path))
        updates.append(ClientUpdate(modules, num_examples=1, client_id=str(path)))
        infos.append(info)
    return updates, infos


def common_value(infos: list[AdapterInfo], field: str, console: Console) -> str | None:
    """The clients' shared base model / task type; the first client's, with a warning, when they differ."""
    values = [getattr(info, field) for info in infos]
    if len(set(values)) > 1:
        differing = ", ".join(sorted(map(repr, set(values))))
        console.print(
            f"warning: the clients give different {field} values ({differing}); using {values[0]!r}",
            style="yellow",
            markup=False,
            highlight=False,
        )
    return values[0]


def aggregation_report(
    method: str,
    tau: float | None,
    weights_given: list[float] | None,
    clients: list[Path],
    result: AggregationResult,
    comm: RoundCommunication,
) -> dict:
    """What ``aggregation.json`` records: inputs, the adapters written, traffic and singular values."""
    return {
        "method": method,
        "threshold": tau,
        "weights": result.weights,
        "weights_given": weights_given,
        "clients": [str(c) for c in clients],
        "adapters": [
            {"path": path, "client": client, "ranks": {name: m.rank for name, m in adapter.items()}}
            for path, client, adapter in written_adapters(result, clients)
        ],
        "communication": comm.to_dict(),
        "singular_values": {
            name: m.singular_values.tolist() for name, m in result.modules.items() if m.singular_values is not None
        },
    }


def written_adapters(result: AggregationResult, clients: list[Path]) -> list[tuple[str, str | None, dict]]:
    """(path relative to OUT, client, adapter) for each PEFT directory written: OUT itself, or one per client."""
    if result.per_client is None:
        return [(".", None, result.modules)]
    return [(f"client_{k}", str(c), adapter) for k, (c, adapter) in enumerate(zip(clients, result.per_client))]


def write_result(
    output: Path,
    result: AggregationResult,
    base_model: str | None,
    task_type: str | None,
    report: dict,
    overwrite: bool,
) -> None:
    extra = {REPORT_NAME: json.dumps(report, indent=2) + "\n"}
    # FedEx-LoRA's residual is a second adapter, OUT/residual: loading it beside OUT gives the exact update
    residual = {RESIDUAL_NAME: result.residual} if result.residual is not None else {}
    if result.per_client is None:
        write_adapter(
            output,
            result.modules,
            base_model,
            extra_files=extra,
            extra_adapters=residual,
            overwrite=overwrite,
            task_type=task_type,
        )
    else:
        adapters = {f"client_{k}": adapter for k, adapter in enumerate(result.per_client)} | residual
        write_adapters(output, adapters, base_model, extra_files=extra, overwrite=overwrite, task_type=task_type)


def print_summary(
    console: Console,
    method: str,
    tau: float | None,
    clients: list[Path],
    result: AggregationResult,
    comm: RoundCommunication,
    output: Path,
) -> None:
    ranks = [m.rank for k in range(len(clients)) for m in result.for_client(k).values()]
    swept = get_method(method).sweep
    title = f"florist aggregate: {method}" + (f" ({swept.name} = {tau:g})" if swept and tau is not None else "")
    rows = [
        ("clients", str(len(clients))),
        ("modules", str(len(result.modules))),
        ("rank min / mean / max", f"{min(ranks)} / {sum(ranks) / len(ranks):.2f} / {max(ranks)}"),
        ("upload (all clients)", f"{comm.total_upload_params:,} params, {format_bytes(sum(comm.upload_bytes))}"),
        ("download (all clients)", f"{comm.total_download_params:,} params, {format_bytes(sum(comm.download_bytes))}"),
        ("Eff x10^4", f"{comm.eff * 1e4:.2f}"),
    ]
    columns = [TableColumn("", justify="left"), TableColumn("", justify="left")]
    cells = [(Text(label, style="bold"), value) for label, value in rows]
    table = fitted_table(columns, cells, console.width, title=title, show_header=False)
    console.print(table)
    console.print(f"wrote {output}", markup=False, highlight=False, soft_wrap=True)


def format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"
