"""The results table in the layout of the paper's: method, tau, accuracy, Eff, and the traffic behind it."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass


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
    """FLoRIST-O: the tau with the best accuracy (ties: less download). FLoRIST-E: the least download
    among taus within ``tolerance`` (absolute accuracy) of that best."""
    florist = [r for r in rows if r.method == "florist" and r.accuracy is not None]
    if not florist:
        return None, None
    best = max(florist, key=lambda r: (r.accuracy, r.eff_e4))
    efficient = max((r for r in florist if r.accuracy >= best.accuracy - tolerance), key=lambda r: (r.eff_e4, r.accuracy))
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


COLUMNS = ["method", "τ", "accuracy (%)", "held-out loss", "Eff (×10⁻⁴)", "mean rank", "params up", "params down", "MB up", "MB down"]


def _cells(r: ResultRow) -> list[str]:
    return [
        r.label or r.method,
        "" if r.threshold is None else f"{r.threshold:.2f}",
        "" if r.accuracy is None else f"{100 * r.accuracy:.2f}",
        "" if r.heldout_loss is None else f"{r.heldout_loss:.4f}",
        f"{r.eff_e4:.2f}",
        f"{r.mean_rank:.1f}",
        f"{r.upload_params:,}",
        f"{r.download_params:,}",
        f"{r.upload_bytes / 1e6:.2f}",
        f"{r.download_bytes / 1e6:.2f}",
    ]


def to_markdown(table: Sequence[ResultRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in table]
    return "\n".join(lines) + "\n"


def to_csv(table: Sequence[ResultRow]) -> str:
    out = io.StringIO()
    fields = list(asdict(table[0])) if table else []
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for r in table:
        writer.writerow(asdict(r))
    return out.getvalue()
