"""Tables that fit a terminal: every table florist prints is laid out here so that no figure is ever cut."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len
from rich.console import JustifyMethod
from rich.table import Table
from rich.text import Text

RULED = box.Box("    \n    \n ── \n    \n ── \n    \n    \n    \n")


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
