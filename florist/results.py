"""The results table in the layout of the paper's: method, swept value, accuracy, Eff, and the traffic behind it.

What it knows of a method it reads from the method's declaration in ``florist.methods``: its name in tables, its
place among the others, whether it sweeps a parameter and which of its rows it picks. ``to_markdown`` and ``to_csv``
write every column; ``terminal_table`` shows the columns that fit a terminal, and ``fitted_table`` lays out any
table florist prints so that it fits a width without cutting a figure.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rich.table import Table
from rich.text import Text

from .methods import METHODS, Method, format_value, in_order
from .tables import TableColumn, fitted_table


@dataclass
class ResultRow:
    method: str  # the method's key (its name in florist.methods)
    threshold: float | None  # the swept parameter's value, for a method with a sweep
    accuracy: float | None  # macro over subjects, in [0, 1]
    heldout_loss: float | None
    eff_e4: float  # the paper's Eff x 10^4, final round
    mean_rank: float
    upload_params: int  # summed over clients and rounds
    download_params: int
    upload_bytes: int
    download_bytes: int
    label: str = ""  # the branch ("name@value"), or the pick's label for a swept method's pick
    upload_threshold: float = 1.0  # its clients' upload threshold τ_up (1: whole pairs)


@dataclass
class PickedRow(ResultRow):
    """A row a swept method names besides its own (``Method.picks``), labelled as the pick: the same fields, so
    results.csv and results.json hold it as any other row."""


def rows_from_records(records: Sequence[dict]) -> list[ResultRow]:
    """One row per branch: accuracy and Eff of its last round, traffic summed over every round."""
    by_branch: dict[str, list[dict]] = {}
    for r in records:
        if r["round"] > 0:
            by_branch.setdefault(r["branch"], []).append(r)
    rows = []
    for label, recs in by_branch.items():
        last = max(recs, key=lambda r: r["round"])
        ranks = list(last["ranks"].values())
        ev = last["evaluation"]
        rows.append(
            ResultRow(
                method=last["method"],
                threshold=last["threshold"],
                accuracy=ev.get("accuracy"),
                heldout_loss=ev.get("heldout_loss"),
                eff_e4=last["communication"]["eff_e4"],
                mean_rank=sum(ranks) / len(ranks),
                upload_params=sum(r["communication"]["total_upload_params"] for r in recs),
                download_params=sum(r["communication"]["total_download_params"] for r in recs),
                upload_bytes=sum(r["communication"]["total_upload_bytes"] for r in recs),
                download_bytes=sum(r["communication"]["total_download_bytes"] for r in recs),
                label=label,
                upload_threshold=last.get("upload_threshold", 1.0),
            )
        )
    return rows


def paper_table(rows: Sequence[ResultRow], config: Any) -> list[ResultRow]:
    """Rows in the order of their methods' ``order``: each method without a sweep, then the rows of methods that are
    not registered (in the records' order), then each swept method's picks (``Method.picks(rows, config)``) and
    every value of its sweep, highest first."""
    methods = in_order([name for name in METHODS if any(r.method == name for r in rows)])
    table = [r for m in methods if m.sweep is None for r in rows if r.method == m.name]
    table += [r for r in rows if r.method not in METHODS]
    for m in (m for m in methods if m.sweep is not None):
        table += [PickedRow(**{**asdict(r), "label": label}) for label, r in m.picks(rows, config)]
        table += sorted((r for r in rows if r.method == m.name), key=lambda r: -(r.threshold or 0))
    return table


def method_of(r: ResultRow) -> Method | None:
    """The declaration of a row's method; None for a method not registered."""
    return METHODS.get(r.method)


def is_swept(r: ResultRow) -> bool:
    """Whether a row's method sweeps a parameter (its rows are one value each, or picks among them)."""
    m = method_of(r)
    return m is not None and m.sweep is not None


def is_pick(r: ResultRow) -> bool:
    return isinstance(r, PickedRow)


VALUE = "value"  # the swept value's column, headed as the swept methods name their parameter (``value_header``)
UP = "τ up"  # the clients' upload threshold: shown only where some row's is below 1
COLUMNS = [
    "method",
    VALUE,
    UP,
    "accuracy (%)",
    "held-out loss",
    "Eff (×10⁻⁴)",
    "mean rank",
    "params up",
    "params down",
    "MB up",
    "MB down",
]

# Columns whose best and second-best values are marked, as the paper does, and which way is better.
MARKED_COLUMNS = {"accuracy (%)": "higher", "held-out loss": "lower", "Eff (×10⁻⁴)": "higher"}


def value_header(table: Sequence[ResultRow]) -> str:
    """The swept value's column header: the parameter names of the swept methods in ``table`` (of every registered
    swept method when none is), joined by " / "."""
    present = [m.name for m in map(method_of, table) if m is not None and m.sweep is not None]
    swept = in_order(list(dict.fromkeys(present))) if present else [m for m in in_order() if m.sweep is not None]
    return " / ".join(dict.fromkeys(m.sweep.name for m in swept)) or VALUE


def headers(table: Sequence[ResultRow]) -> list[str]:
    return [value_header(table) if c == VALUE else c for c in COLUMNS]


def display_name(r: ResultRow) -> str:
    """A pick by its label, every other row by its method's display name (an unregistered method by its key)."""
    m = method_of(r)
    return r.label if is_pick(r) else m.display if m is not None else r.method


def compared(table: Sequence[ResultRow]) -> list[bool]:
    """The rows the paper ranks against each other: those of methods without a sweep, and the swept methods' picks
    (not every value of a sweep).

    When there are no picks, every row competes.
    """
    if not any(map(is_pick, table)):
        return [True] * len(table)
    return [is_pick(r) or not is_swept(r) for r in table]


def ranks_in_column(values: Sequence[float | None], higher_is_better: bool) -> list[str]:
    """'best', 'second' or '' per value: ties share a mark; None values are never marked."""
    distinct = sorted({v for v in values if v is not None}, reverse=higher_is_better)
    marks = {v: m for v, m in zip(distinct, ("best", "second"))}
    return [marks.get(v, "") if v is not None else "" for v in values]


def _values(r: ResultRow) -> dict[str, float | None]:
    """The marked columns' values, rounded as they are printed so that equal-looking cells get equal marks."""
    return {
        "accuracy (%)": None if r.accuracy is None else round(100 * r.accuracy, 2),
        "held-out loss": None if r.heldout_loss is None else round(r.heldout_loss, 4),
        "Eff (×10⁻⁴)": round(r.eff_e4, 2),
    }


def emphasis(table: Sequence[ResultRow]) -> list[dict[str, str]]:
    """Per row, the marked columns that hold the best or second-best value among the compared rows."""
    in_play = compared(table)
    marks: list[dict[str, str]] = [{} for _ in table]
    for column, direction in MARKED_COLUMNS.items():
        values = [_values(r)[column] if play else None for r, play in zip(table, in_play)]
        for row_marks, mark in zip(marks, ranks_in_column(values, direction == "higher")):
            if mark:
                row_marks[column] = mark
    return marks


def _cells(r: ResultRow, paper_names: bool) -> list[str]:
    return [
        display_name(r) if paper_names else r.label or r.method,
        "" if r.threshold is None else format_value(r.threshold),
        "" if r.upload_threshold == 1.0 else format_value(r.upload_threshold),
        "" if r.accuracy is None else f"{100 * r.accuracy:.2f}",
        "" if r.heldout_loss is None else f"{r.heldout_loss:.4f}",
        f"{r.eff_e4:.2f}",
        f"{r.mean_rank:.1f}",
        f"{r.upload_params:,}",
        f"{r.download_params:,}",
        f"{r.upload_bytes / 1e6:.2f}",
        f"{r.download_bytes / 1e6:.2f}",
    ]


def _emphasize(cell: str, mark: str) -> str:
    return {"best": f"**{cell}**", "second": f"*{cell}*"}.get(mark, cell) if cell else cell


def to_markdown(table: Sequence[ResultRow], marks: bool = True, paper_names: bool = False) -> str:
    """The table in markdown; with ``marks``, the best value of a marked column in bold and the second in italics.

    Rows are named by branch label (a method's key, ``key@value`` for a swept method's branch, a pick's label), or
    with ``paper_names`` by their methods' display names (a swept method's value in the next column) and picks by
    their label.
    """
    row_marks = emphasis(table) if marks else [{} for _ in table]
    shown = [c != UP or any(r.upload_threshold != 1.0 for r in table) for c in COLUMNS]
    header = [h for h, keep in zip(headers(table), shown) if keep]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r, m in zip(table, row_marks):
        cells = [_emphasize(cell, m.get(column, "")) for column, cell in zip(COLUMNS, _cells(r, paper_names))]
        lines.append("| " + " | ".join(cell for cell, keep in zip(cells, shown) if keep) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Sequence[ResultRow]) -> str:
    out = io.StringIO()
    fields = list(asdict(table[0])) if table else []
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for r in table:
        writer.writerow(asdict(r))
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Tables on a terminal

# The results columns a terminal shows, most wanted first: the method, its value, the quality and the traffic, then
# the rest as the width allows (80 columns fit all but the parameter counts). Columns grouped together are shown or
# left out together. results.md keeps every column.
TERMINAL_COLUMNS = (
    ("method",),
    (VALUE,),
    ("accuracy (%)",),
    ("held-out loss",),
    ("MB up", "MB down"),
    (UP,),
    ("Eff (×10⁻⁴)",),
    ("mean rank",),
    ("params up", "params down"),
)
ALWAYS_SHOWN = 3  # the method, its value and the first quality column stay at any width
MARK_STYLES = {"best": "bold", "second": "italic"}


# rich's SIMPLE_HEAD, with a rule where a section of rows ends (SIMPLE_HEAD leaves a blank line there)
def terminal_table(
    table: Sequence[ResultRow], width: int, title: str | None = None, caption: str | None = None
) -> Table:
    """The results for a terminal ``width`` columns wide: rows named as the paper names them, best values in bold and
    second-best in italics, columns without a value left out, and of the others those of TERMINAL_COLUMNS that fit."""
    cells = [_cells(r, paper_names=True) for r in table]
    present = {name for k, name in enumerate(COLUMNS) if k == 0 or any(row[k] for row in cells)}
    groups = [[name for name in group if name in present] for group in TERMINAL_COLUMNS]
    groups = [group for group in groups if group]
    order = [name for name in COLUMNS if any(name in group for group in groups)]  # results.md's order
    rows = [
        [Text(row[COLUMNS.index(name)], style=MARK_STYLES.get(marks.get(name, ""), "")) for name in order]
        for row, marks in zip(cells, emphasis(table))
    ]
    header = dict(zip(COLUMNS, headers(table)))
    columns = [TableColumn(header[name], justify="left" if name == "method" else "right") for name in order]
    drop = [[order.index(name) for name in group] for group in reversed(groups[ALWAYS_SHOWN:])]
    in_play = compared(table)
    # a rule between the compared rows and the rest of the sweeps
    sweep_starts = [k for k in range(1, len(table)) if in_play[k - 1] and not in_play[k]]
    return fitted_table(
        columns, rows, width, drop=drop, title=title, caption=caption, rule_after={k - 1 for k in sweep_starts}
    )
