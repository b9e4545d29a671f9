"""The results table in the layout of the paper's: method, tau, accuracy, Eff, and the traffic behind it.

``to_markdown`` and ``to_csv`` write every column; ``terminal_table`` shows the columns that fit a terminal, and
``fitted_table`` lays out any table florist prints so that it fits a width without cutting a figure.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal

from rich import box
from rich.cells import cell_len
from rich.console import JustifyMethod
from rich.table import Table
from rich.text import Text


def format_tau(tau: float) -> str:
    """A tau as labels and tables write it: its shortest exact decimal form, with at least 2 decimals.

    0.9 -> "0.90", 0.901 -> "0.901", 1e-05 -> "0.00001": two different taus never read alike, and the taus of a
    2-decimal grid keep the names earlier runs saved them under.
    """
    whole, _, decimals = format(Decimal(repr(float(tau))), "f").partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


def branch_label(method: str, tau: float | None = None) -> str:
    """A branch's name in the run directory and the results: its method, with FLoRIST's tau ("florist@0.90")."""
    return method if tau is None else f"{method}@{format_tau(tau)}"


@dataclass
class ResultRow:
    method: str  # fedit, flora, ..., florist, or FLoRIST-O / FLoRIST-E picks
    threshold: float | None
    accuracy: float | None  # macro over subjects, in [0, 1]
    heldout_loss: float | None
    eff_e4: float  # the paper's Eff x 10^4, final round
    mean_rank: float
    upload_params: int  # summed over clients and rounds
    download_params: int
    upload_bytes: int
    download_bytes: int
    label: str = ""


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
            )
        )
    return rows


def pick_florist(rows: Sequence[ResultRow], tolerance: float) -> tuple[ResultRow | None, ResultRow | None]:
    """FLoRIST-O: the tau with the best accuracy; ties go to the lower held-out loss, then to less download.
    FLoRIST-E: the least download among taus within ``tolerance`` (absolute accuracy) of that best.

    Without accuracy (no questions were asked) both are picked on held-out loss instead, lower being better.
    """
    florist = [r for r in rows if r.method == "florist"]
    if florist and all(r.accuracy is not None for r in florist):
        score = lambda r: r.accuracy  # noqa: E731
    elif florist and all(r.heldout_loss is not None for r in florist):
        score = lambda r: -r.heldout_loss  # noqa: E731
    else:
        return None, None
    # On a small question set many taus tie on accuracy; the loss separates them.
    loss = lambda r: -r.heldout_loss if r.heldout_loss is not None else 0.0  # noqa: E731
    best = max(florist, key=lambda r: (score(r), loss(r), r.eff_e4))
    efficient = max((r for r in florist if score(r) >= score(best) - tolerance), key=lambda r: (r.eff_e4, score(r)))
    return best, efficient


def paper_table(rows: Sequence[ResultRow], tolerance: float) -> list[ResultRow]:
    """Baselines in the paper's order, then FLoRIST-O and FLoRIST-E, then every tau of the sweep."""
    order = {"fedit": 0, "flora": 1, "flexlora": 2, "ffa": 3}
    table = sorted((r for r in rows if r.method != "florist"), key=lambda r: order.get(r.method, 9))
    best, efficient = pick_florist(rows, tolerance)
    for name, pick in (("FLoRIST-O", best), ("FLoRIST-E", efficient)):
        if pick is not None:
            table.append(ResultRow(**{**asdict(pick), "label": name}))
    table += sorted((r for r in rows if r.method == "florist"), key=lambda r: -(r.threshold or 0))
    return table


PICKS = ("FLoRIST-O", "FLoRIST-E")
METHOD_NAMES = {"fedit": "FedIT", "flora": "FLoRA", "flexlora": "FlexLoRA", "ffa": "FFA-LoRA", "florist": "FLoRIST"}

COLUMNS = [
    "method",
    "τ",
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


def display_name(r: ResultRow) -> str:
    """FLoRIST-O/E picks by their label, every other row by its method's name in the paper."""
    return r.label if r.label in PICKS else METHOD_NAMES.get(r.method, r.method)


def compared(table: Sequence[ResultRow]) -> list[bool]:
    """The rows the paper ranks against each other: the baselines and FLoRIST-O/E (not every tau of the sweep).

    When there are no picks, every row competes.
    """
    if not any(r.label in PICKS for r in table):
        return [True] * len(table)
    return [r.method != "florist" or r.label in PICKS for r in table]


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
        "" if r.threshold is None else format_tau(r.threshold),
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

    Rows are named by branch label (``fedit``, ``florist@0.90``, ``FLoRIST-O``), or with ``paper_names`` as the
    paper names the methods (FedIT, FFA-LoRA, FLoRIST with its tau in the next column).
    """
    row_marks = emphasis(table) if marks else [{} for _ in table]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for r, m in zip(table, row_marks):
        cells = [_emphasize(cell, m.get(column, "")) for column, cell in zip(COLUMNS, _cells(r, paper_names))]
        lines.append("| " + " | ".join(cells) + " |")
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

# The results columns a terminal shows, most wanted first: the method, its tau, the quality and the traffic, then
# the rest as the width allows (80 columns fit all but the parameter counts). Columns grouped together are shown or
# left out together. results.md keeps every column.
TERMINAL_COLUMNS = (
    ("method",),
    ("τ",),
    ("accuracy (%)",),
    ("held-out loss",),
    ("MB up", "MB down"),
    ("Eff (×10⁻⁴)",),
    ("mean rank",),
    ("params up", "params down"),
)
ALWAYS_SHOWN = 3  # the method, its tau and the first quality column stay at any width
MARK_STYLES = {"best": "bold", "second": "italic"}

# rich's SIMPLE_HEAD, with a rule where a section of rows ends (SIMPLE_HEAD leaves a blank line there)
RULED = box.Box("    \n    \n ── \n    \n ── \n    \n    \n    \n")


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
    columns = [TableColumn(name, justify="left" if name == "method" else "right") for name in order]
    drop = [[order.index(name) for name in group] for group in reversed(groups[ALWAYS_SHOWN:])]
    in_play = compared(table)
    # a rule between the compared rows and the rest of FLoRIST's tau sweep
    sweep_starts = [k for k in range(1, len(table)) if in_play[k - 1] and not in_play[k]]
    return fitted_table(
        columns, rows, width, drop=drop, title=title, caption=caption, rule_after={k - 1 for k in sweep_starts}
    )


@dataclass(frozen=True)
class TableColumn:
    """A column of a terminal table. Its cells are figures, each kept on one line, unless ``prose``: words that may
    wrap between them. A header may wrap between its words where the table would not fit otherwise."""

    header: str
    justify: JustifyMethod = "right"
    prose: bool = False


def fitted_table(
    columns: Sequence[TableColumn],
    rows: Sequence[Sequence[str | Text]],
    width: int,
    *,
    drop: Sequence[Collection[int]] = (),
    title: str | None = None,
    caption: str | None = None,
    rule_after: Collection[int] = (),
    show_header: bool = True,
) -> Table:
    """A rich table no wider than ``width`` in which no figure is cut: headers wrap between words first; if that is
    not enough, the groups of columns ``drop`` lists (by index) are left out, group by group, until the rest fit.
    Below the width the remaining columns need, figures fold onto a second line rather than lose digits.

    ``rule_after``: indices of the rows a rule follows (a total row below the others, say).
    """
    keep = list(range(len(columns)))
    widths = _widths([columns[k] for k in keep], [[row[k] for k in keep] for row in rows], width)
    for group in drop:
        if widths is not None:
            break
        keep = [k for k in keep if k not in group]
        widths = _widths([columns[k] for k in keep], [[row[k] for k in keep] for row in rows], width)
    if widths is None:  # narrower than anything can fit: every column at its least
        widths = [_needs(columns[k], [row[k] for row in rows])[0] for k in keep]
    table = Table(
        title=title and Text(title, overflow="fold"),
        caption=caption and Text(caption, overflow="fold"),
        box=RULED,
        show_edge=False,
        pad_edge=False,
        show_header=show_header,
    )
    for k, w in zip(keep, widths):
        c = columns[k]
        table.add_column(
            Text(c.header, justify=c.justify, no_wrap=False, overflow="fold"),
            justify=c.justify,
            width=w,
            overflow="fold",  # only below the least width: a figure goes on in the next line, never cut short
        )
    for i, row in enumerate(rows):
        table.add_row(*(row[k] for k in keep), end_section=i in rule_after and i < len(rows) - 1)
    return table


def _table_width(widths: Sequence[int]) -> int:
    """The width of a ``fitted_table`` whose columns hold ``widths`` characters: one space of padding on either side
    of each column's border, and the border itself."""
    return sum(widths) + 3 * (len(widths) - 1) if widths else 0


def _widths(columns: Sequence[TableColumn], rows: Sequence[Sequence[str | Text]], width: int) -> list[int] | None:
    """Each column's width in a table at most ``width`` wide, or None when the columns cannot fit it."""
    needs = [_needs(c, [row[k] for row in rows]) for k, c in enumerate(columns)]
    widths = [least for least, _ in needs]
    spare = width - _table_width(widths)
    if spare < 0:
        return None
    # Figure columns first, fewest missing characters first, each only if its header then fits on one line (a wider
    # column whose header still wraps gains nothing); prose columns take what is left.
    for k in sorted(range(len(columns)), key=lambda k: (columns[k].prose, needs[k][1] - needs[k][0])):
        missing = needs[k][1] - widths[k]
        if columns[k].prose or missing <= spare:
            widths[k] += min(missing, spare)
            spare -= min(missing, spare)
    return widths


def _needs(column: TableColumn, cells: Sequence[str | Text]) -> tuple[int, int]:
    """(least, wanted) width of a column: its figures whole (prose: its longest word) and its header's longest word;
    everything on one line."""
    texts = [c.plain if isinstance(c, Text) else c for c in cells]
    pieces = [w for t in texts for w in t.split()] if column.prose else texts
    least = max([cell_len(p) for p in pieces] + [cell_len(w) for w in column.header.split()] + [1])
    wanted = max(cell_len(t) for t in [column.header, *texts])
    return least, max(least, wanted)
