"""Reports people read: a run directory's results as markdown and plots.

    report.md                      setup, results table (paper layout), summary, plots; one section per run
    plots/<run>-tradeoff.png       accuracy / held-out loss against download, Pareto front, FLoRIST-O and -E
    plots/<run>-ranks.png          the rank FLoRIST kept per layer and module, for every tau
    plots/<run>-spectra.png        singular value spectra of a few modules, with the tau cut-offs
    plots/<run>-rounds.png         accuracy / held-out loss per round (runs with several rounds)

Everything is read from what a run wrote (config.toml, metrics.jsonl, rounds/NNN/<branch>/spectra.json,
rounds/NNN/clients/<group>/client_K/client.json); nothing is recomputed from adapters. Every run is loaded
and every plot rendered in memory before the first file is written, and each file is written to a temporary
name and renamed, so a failure leaves no partial report.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from .aggregation.svd import energy_rank
from .config import heldout_source
from .files import atomic_write_bytes, atomic_write_text
from .reading import parse_json_lines, path_kind, read_json_file, read_text_file
from .results import (
    METHOD_NAMES,
    PICKS,
    ResultRow,
    branch_label,
    compared,
    display_name,
    format_tau,
    paper_table,
    rows_from_records,
    to_markdown,
)

BASELINE_STYLE = {  # marker and colour per baseline, the same in every plot
    "fedit": ("s", "#1f77b4"),
    "flora": ("D", "#8c564b"),
    "flexlora": ("^", "#2ca02c"),
    "ffa": ("v", "#9467bd"),
}
FLORIST_CMAP = "viridis"
DPI = 110


class ReportError(ValueError):
    """A path that is not a run directory, or a run that cannot be reported; the message names it."""


# --- reading a run ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a run directory holds, as the report needs it."""

    path: Path
    name: str
    config: dict
    records: list[dict]
    table: list[ResultRow]
    tolerance: float
    training: dict = field(default_factory=dict)  # tokens, seconds, clients, per group

    @property
    def rounds(self) -> int:
        return max((r["round"] for r in self.records), default=0)

    @property
    def base(self) -> dict | None:
        return next((r["evaluation"] for r in self.records if r["round"] == 0), None)

    @property
    def has_accuracy(self) -> bool:
        return any(r.accuracy is not None for r in self.table)

    @property
    def has_loss(self) -> bool:
        return any(r.heldout_loss is not None for r in self.table)

    def pick(self, label: str) -> ResultRow | None:
        return next((r for r in self.table if r.label == label), None)

    def compared_rows(self) -> list[ResultRow]:
        return [r for r, keep in zip(self.table, compared(self.table)) if keep]

    def sweep_rows(self) -> list[ResultRow]:
        return [r for r in self.table if r.method == "florist" and r.label not in PICKS]


def load_run(path: str | Path) -> Run:
    """Read a run directory; a missing directory or one without metrics.jsonl is a ``ReportError``, and so is every
    damaged file in it that the report reads (the message names the file, and the line and field where it can)."""
    path = Path(path)
    kind = path_kind(path, ReportError)
    if kind is None:
        raise ReportError(f"{path}: no such run directory")
    if kind != "dir":
        raise ReportError(f"{path}: not a directory")
    metrics = path / "metrics.jsonl"
    if path_kind(metrics, ReportError) is None:
        raise ReportError(f"{path}: not a run directory (no metrics.jsonl)")
    records = []
    for number, record in parse_json_lines(read_text_file(metrics, ReportError), str(metrics), ReportError):
        check_record(record, f"{metrics}:{number}")
        records.append(record)
    config = _read_config(path / "config.toml")
    tolerance = config.get("federation", {}).get("florist_e_tolerance", 0.01)
    try:
        table = paper_table(rows_from_records(records), tolerance)
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise ReportError(f"{metrics}: a record lacks a field the table needs ({e})") from None
    if not table:
        raise ReportError(f"{path}: no finished round yet (metrics.jsonl holds only the base model)")
    return Run(path, path.resolve().name, config, records, table, tolerance, _training(path))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _optional(check):
    return lambda value: value is None or check(value)


def _is_amount(value: object) -> bool:
    return _is_number(value) and value >= 0  # NaN fails the comparison


def _is_singular_value(value: object) -> bool:
    return _is_amount(value) and math.isfinite(value)


def _is_threshold(value: object) -> bool:
    return value is None or (_is_number(value) and 0 < value <= 1)


def _is_ranks(value: object) -> bool:
    return isinstance(value, dict) and bool(value) and all(_is_count(v) for v in value.values())


def _list_of(check):
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


# What every metrics record must hold (field, check, what it must be), what a finished round's records hold besides,
# and the fields of a record's "evaluation" and "communication" objects, as the tables and plots use them.
RECORD_FIELDS = (
    ("round", _is_count, "a round number"),
    ("branch", lambda v: isinstance(v, str), "a name"),
    ("evaluation", lambda v: isinstance(v, dict), "an object"),
)
ROUND_FIELDS = (
    ("method", lambda v: isinstance(v, str), "a method name"),
    ("threshold", _is_threshold, "a number in (0, 1] or null"),
    ("ranks", _is_ranks, "an object of module ranks"),
    ("communication", lambda v: isinstance(v, dict), "an object"),
    ("server_seconds", _is_number, "a number"),
)
EVALUATION_FIELDS = (
    ("accuracy", _optional(_is_number)),
    ("micro_accuracy", _optional(_is_number)),
    ("heldout_loss", _optional(_is_number)),
    ("seconds", _optional(_is_number)),
    ("n_questions", _optional(_is_count)),
)
COMMUNICATION_FIELDS = (
    "eff_e4",
    "total_upload_params",
    "total_download_params",
    "total_upload_bytes",
    "total_download_bytes",
)


def check_record(record: object, where: str) -> None:
    """A metrics.jsonl record with every field the report reads, of the type it reads it as; ``where`` (file:line)
    and the field open the error."""
    if not isinstance(record, dict):
        raise ReportError(f"{where}: not a metrics record (a JSON object), found a {type(record).__name__}")
    fields = RECORD_FIELDS + (ROUND_FIELDS if _is_count(record.get("round")) and record["round"] > 0 else ())
    for key, check, what in fields:
        if key not in record:
            raise ReportError(f"{where}: not a metrics record (no {key!r})")
        if not check(record[key]):
            raise ReportError(f"{where}: {key} is {_shown(record[key])}, expected {what}")
    if record["round"] > 0 and record["method"] == "florist" and record["threshold"] is None:
        raise ReportError(f"{where}: a FLoRIST record without its threshold")
    for key, check in EVALUATION_FIELDS:
        if not check(record["evaluation"].get(key)):
            raise ReportError(f"{where}: evaluation.{key} is {_shown(record['evaluation'][key])}, expected a number")
    for key in COMMUNICATION_FIELDS if record["round"] > 0 else ():
        if not _is_amount(record["communication"].get(key)):
            raise ReportError(
                f"{where}: communication.{key} is {_shown(record['communication'].get(key))}, expected a number >= 0"
            )


def _shown(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


# config.toml settings the report formats as numbers or joins as lists; anything else it only prints.
CONFIG_SECTIONS = ("model", "data", "lora", "train", "federation", "eval")
CONFIG_TYPES = {
    "federation.florist_e_tolerance": (_is_amount, "a number >= 0"),
    "federation.methods": (_list_of(lambda v: isinstance(v, str)), "a list of method names"),
    "lora.ranks": (_list_of(_is_count), "a list of ranks"),
    "lora.alpha_per_rank": (_is_number, "a number"),
    "lora.target_modules": (
        lambda v: isinstance(v, str) or _list_of(lambda x: isinstance(x, str))(v),
        "a list of module names or a regex",
    ),
    "train.epochs": (_is_number, "a number"),
}


def _read_config(path: Path) -> dict:
    if path_kind(path, ReportError) is None:
        return {}
    text = read_text_file(path, ReportError)
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ReportError(f"{path}: invalid TOML: {e}") from None
    except RecursionError:
        raise ReportError(f"{path}: invalid TOML: nested too deeply") from None
    for section in CONFIG_SECTIONS:
        if not isinstance(config.get(section, {}), dict):
            raise ReportError(f"{path}: {section} is {_shown(config[section])}, expected a [{section}] table")
    for key, (check, what) in CONFIG_TYPES.items():
        section, name = key.split(".")
        if name in config.get(section, {}) and not check(config[section][name]):
            raise ReportError(f"{path}: {key} is {_shown(config[section][name])}, expected {what}")
    return config


def _training(path: Path) -> dict:
    """Client training per group (shared, ffa, ...), summed over rounds, from each client's client.json."""
    groups: dict[str, dict] = {}
    # the folders are globbed and the file looked up in each: a glob would skip a client.json in a link loop unseen
    for info_file in sorted(d / "client.json" for d in path.glob("rounds/*/clients/*/client_*")):
        if path_kind(info_file, ReportError) is None:
            continue  # a client that saved no info is left out of the totals
        info = read_json_file(info_file, ReportError)
        if not isinstance(info, dict):
            raise ReportError(f"{info_file}: expected a JSON object, found a {type(info).__name__}")
        for key, check in (("steps", _is_count), ("tokens", _is_count), ("seconds", _is_number)):
            if not check(info.get(key, 0)):
                raise ReportError(f"{info_file}: {key} is {_shown(info[key])}, expected a number")
        g = groups.setdefault(info_file.parent.parent.name, {"clients": 0, "steps": 0, "tokens": 0, "seconds": 0.0})
        g["clients"] += 1
        g["steps"] += info.get("steps", 0)
        g["tokens"] += info.get("tokens", 0)
        g["seconds"] += info.get("seconds", 0.0)
    return groups


def load_spectra(run: Run, round_number: int = 1) -> dict[str, list[float]]:
    """FLoRIST's singular values per module in a round (every tau of round 1 shares them), else FlexLoRA's."""
    round_dir = run.path / "rounds" / f"{round_number:03d}"
    branches = sorted(round_dir.glob("florist@*")) + [round_dir / "flexlora"]
    for f in (b / "spectra.json" for b in branches):
        if path_kind(f, ReportError) is None:
            continue
        spectra = read_json_file(f, ReportError)
        if not isinstance(spectra, dict) or not all(_list_of(_is_singular_value)(v) for v in spectra.values()):
            raise ReportError(f"{f}: expected singular values per module ({{module: [finite numbers >= 0]}})")
        return spectra
    return {}


# --- figures -----------------------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _metrics(run: Run) -> list[tuple[str, str, bool]]:
    """(ResultRow attribute, axis label, higher is better) for every metric the run measured."""
    out = []
    if run.has_accuracy:
        out.append(("accuracy", "accuracy (%)", True))
    if run.has_loss:
        out.append(("heldout_loss", "held-out loss (nats / token)", False))
    return out


def _targets(targets) -> str:
    """``lora.target_modules`` as the config gave it: a regex as it is, a list of names joined."""
    return targets if isinstance(targets, str) else ", ".join(targets)


def _value(r: ResultRow, attribute: str) -> float | None:
    v = getattr(r, attribute)
    return None if v is None else (100 * v if attribute == "accuracy" else v)


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both less download (x) and a better metric (y), by increasing x."""
    sign = 1 if higher_is_better else -1
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * y > sign * front[-1][1]:
            front.append((x, y))
    return front


def plot_tradeoff(run: Run) -> Figure | None:
    """Each measured metric against the total download, every method and tau, with the Pareto front."""
    metrics = _metrics(run)
    if not metrics:
        return None
    fig = Figure(figsize=(6.4 * len(metrics), 4.8), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    taus = [r.threshold for r in run.sweep_rows()]
    norm = Normalize(min(taus, default=0.8), max(taus, default=1.0) + 1e-9)
    sweep_points = None
    for ax, metric in zip(axes, metrics):
        sweep_points = _tradeoff_panel(ax, run, *metric, norm) or sweep_points
    if sweep_points is not None:
        fig.colorbar(sweep_points, ax=list(axes), label="FLoRIST threshold τ", shrink=0.85)
    fig.suptitle(f"{run.name}: quality against communication", weight="bold")
    return fig


def _tradeoff_panel(ax, run: Run, attribute: str, label: str, higher: bool, norm: Normalize):
    """One metric against download; returns FLoRIST's scatter (for the colour bar), if any."""
    rows = [r for r in run.table if _value(r, attribute) is not None and r.label not in PICKS]
    front = pareto_front([(r.download_bytes / 1e6, _value(r, attribute)) for r in rows], higher)
    ax.plot(*zip(*front), color="0.6", lw=5, alpha=0.35, zorder=1, label="Pareto front", drawstyle="steps-post")
    for r in rows:
        if r.method in BASELINE_STYLE:
            marker, colour = BASELINE_STYLE[r.method]
            ax.scatter(
                r.download_bytes / 1e6,
                _value(r, attribute),
                marker=marker,
                s=80,
                color=colour,
                edgecolor="black",
                zorder=3,
                label=METHOD_NAMES[r.method],
            )
    florist = sorted((r for r in rows if r.method == "florist"), key=lambda r: r.threshold)
    sweep_points = None
    if florist:
        xs, ys = [r.download_bytes / 1e6 for r in florist], [_value(r, attribute) for r in florist]
        ax.plot(xs, ys, color="0.3", lw=0.8, zorder=2)
        sweep_points = ax.scatter(
            xs,
            ys,
            c=[r.threshold for r in florist],
            cmap=FLORIST_CMAP,
            norm=norm,
            s=40,
            edgecolor="black",
            linewidth=0.5,
            zorder=4,
            label="FLoRIST (colour: τ)",
        )
    for text, r, offset in _pick_labels(run):
        if _value(r, attribute) is not None:
            x, y = r.download_bytes / 1e6, _value(r, attribute)
            ax.scatter(x, y, s=220, facecolor="none", edgecolor="crimson", linewidth=1.8, zorder=5)
            ax.annotate(
                text,
                (x, y),
                xytext=offset,
                textcoords="offset points",
                fontsize=9,
                color="crimson",
                weight="bold",
                zorder=6,
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            )
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel("download, all clients and rounds (MB, log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{label.split(' (')[0]} vs download ({'higher' if higher else 'lower'} is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return sweep_points


def _pick_labels(run: Run) -> list[tuple[str, ResultRow, tuple[int, int]]]:
    """Labels for FLoRIST-O and -E; one label when both are the same tau."""
    best, efficient = run.pick("FLoRIST-O"), run.pick("FLoRIST-E")
    if best is not None and efficient is not None and best.threshold == efficient.threshold:
        return [(f"FLoRIST-O = FLoRIST-E (τ={format_tau(best.threshold)})", best, (8, 10))]
    return [
        (f"{name} (τ={format_tau(r.threshold)})", r, offset)
        for name, r, offset in (("FLoRIST-O", best, (8, 10)), ("FLoRIST-E", efficient, (8, -16)))
        if r is not None
    ]


_LAYER = re.compile(r"layers?\.(\d+)\.")


def split_module(name: str) -> tuple[int | None, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'q_proj'); names without a layer index -> (None, name)."""
    m = _LAYER.search(name)
    return (int(m.group(1)), name.rsplit(".", 1)[-1]) if m else (None, name)


def florist_ranks(run: Run) -> dict[float, dict[str, int]]:
    """tau -> {module: rank kept} in the run's last round."""
    last = run.rounds
    return {
        r["threshold"]: r["ranks"]
        for r in run.records
        if r["round"] == last and r["method"] == "florist" and r.get("threshold") is not None
    }


def plot_ranks(run: Run) -> Figure | None:
    """Heat map of the rank FLoRIST kept: tau down, layer across, one panel per adapted module kind."""
    by_tau = florist_ranks(run)
    if not by_tau:
        return None
    taus = sorted(by_tau, reverse=True)
    modules = sorted(by_tau[taus[0]])
    kinds = sorted({split_module(m)[1] for m in modules})
    layers = sorted({split_module(m)[0] for m in modules if split_module(m)[0] is not None})
    vmax = max(max(ranks.values(), default=1) for ranks in by_tau.values())
    # one panel per module kind, stacked, each as wide as its layers need
    width = min(16, max(6.5, 1.8 + 0.42 * max(len(layers), 1)))
    fig = Figure(figsize=(width, len(kinds) * (1.1 + 0.3 * len(taus))), layout="constrained")
    axes = fig.subplots(len(kinds), 1, squeeze=False)[:, 0]
    for ax, kind in zip(axes, kinds):
        columns = [m for m in modules if split_module(m)[1] == kind]
        columns.sort(key=lambda m: (split_module(m)[0] is None, split_module(m)[0] or 0, m))
        grid = [[by_tau[t].get(m, 0) for m in columns] for t in taus]
        # log colours: tau = 1 keeps every component and would flatten the differences between lower taus
        image = ax.imshow(grid, aspect="auto", cmap="magma", norm=LogNorm(1, max(vmax, 2)), interpolation="nearest")
        if len(columns) * len(taus) <= 1000:
            for i, row in enumerate(grid):
                for j, value in enumerate(row):
                    ax.text(
                        j,
                        i,
                        str(value),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="black" if value > vmax**0.7 else "white",
                    )
        ticks = [split_module(m)[0] for m in columns]
        ax.set_xticks(
            range(len(columns)),
            [str(t) if t is not None else m for t, m in zip(ticks, columns)],
            fontsize=7,
            rotation=0 if all(t is not None for t in ticks) else 90,
        )
        ax.set_yticks(range(len(taus)), [format_tau(t) for t in taus], fontsize=7)
        ax.set_xlabel("layer" if all(t is not None for t in ticks) else "module")
        ax.set_ylabel("threshold τ")
        ax.set_title(f"{kind}: rank kept")
    fig.colorbar(image, ax=list(axes), label="rank kept (components, log colour scale)", shrink=0.9, aspect=30)
    fig.suptitle(f"{run.name}: FLoRIST's rank per layer and module (round {run.rounds})", weight="bold")
    return fig


def spectra_modules(names: Sequence[str], count: int = 4) -> list[str]:
    """A few modules to show: the first and last layer of each module kind."""
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for n in names:
        layer, kind = split_module(n)
        by_kind.setdefault(kind, []).append((layer if layer is not None else 0, n))
    chosen: list[str] = []
    for _, members in sorted(by_kind.items()):
        for n in (min(members)[1], max(members)[1]):
            if n not in chosen:
                chosen.append(n)
    return chosen[:count]


def cut_taus(taus: Sequence[float]) -> list[float]:
    """A handful of the sweep's taus to draw: its ends and a few round values between."""
    taus = sorted(taus)
    if len(taus) <= 5:
        return taus
    wanted = [taus[0], 0.90, 0.95, 0.99, taus[-1]]
    return sorted({min(taus, key=lambda t: abs(t - w)) for w in wanted})


def plot_spectra(run: Run) -> Figure | None:
    """Singular values of round 1's exact aggregate for a few modules, with the rank each tau keeps."""
    spectra = load_spectra(run)
    if not spectra:
        return None
    names = spectra_modules(sorted(name for name, values in spectra.items() if any(v > 0 for v in values)))
    if not names:
        return None
    taus = cut_taus([r.threshold for r in run.sweep_rows() if r.threshold is not None])
    colours = {t: c for t, c in zip(taus, _colours(len(taus)))}
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(6.2 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        values = [v for v in spectra[name] if v > 0]
        index = range(1, len(values) + 1)
        ax.semilogy(index, values, "o-", ms=2.5, lw=1, color="black", label="σᵢ")
        energy_ax = ax.twinx()
        total = sum(v * v for v in values) or 1.0
        cumulative, running = [], 0.0
        for v in values:
            running += v * v
            cumulative.append(100 * running / total)
        energy_ax.plot(index, cumulative, color="tab:orange", lw=1.2, alpha=0.8)
        energy_ax.set_ylim(0, 101)
        energy_ax.set_ylabel("cumulative energy (%)", color="tab:orange")
        for t in taus:
            p = energy_rank(torch.tensor(values), t)  # the rule FLoRIST applied
            ax.axvline(p, color=colours[t], ls="--", lw=1.2, label=f"τ={format_tau(t)}: keeps {p}")
        ax.set_xlabel("component i")
        ax.set_ylabel("singular value σᵢ (log scale)")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, len(values) + 1)
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(f"{run.name}: singular values of the exact aggregate (round 1) and FLoRIST's cut-offs", weight="bold")
    return fig


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps[FLORIST_CMAP]
    return [cmap(i / max(1, n - 1) * 0.9) for i in range(n)]


def round_series(run: Run, attribute: str) -> dict[str, list[tuple[int, float]]]:
    """Per compared branch (baselines, FLoRIST-O/E by their tau), its metric per round, round 0 being the base."""
    key = {"accuracy": "accuracy", "heldout_loss": "heldout_loss"}[attribute]
    scale = 100 if attribute == "accuracy" else 1
    base = run.base or {}
    series: dict[str, list[tuple[int, float]]] = {}
    picks = {r.label: r for r in run.table if r.label in PICKS}
    wanted = {r.label: display_name(r) for r in run.compared_rows() if r.label not in PICKS}
    wanted.update(
        {branch_label("florist", r.threshold): f"{name} (τ={format_tau(r.threshold)})" for name, r in picks.items()}
    )
    for branch, shown in wanted.items():
        points = [
            (rec["round"], scale * rec["evaluation"][key])
            for rec in run.records
            if rec["branch"] == branch and rec["evaluation"].get(key) is not None
        ]
        if base.get(key) is not None:
            points.insert(0, (0, scale * base[key]))
        if points:
            series[shown] = sorted(points)
    return series


def plot_rounds(run: Run) -> Figure | None:
    """Each metric per round for the baselines and FLoRIST-O/E; only for runs of several rounds."""
    metrics = _metrics(run)
    if run.rounds < 2 or not metrics:
        return None
    fig = Figure(figsize=(6.2 * len(metrics), 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (attribute, label, higher) in zip(axes, metrics):
        for shown, points in round_series(run, attribute).items():
            method = next((m for m, n in METHOD_NAMES.items() if n == shown), None)
            marker, colour = BASELINE_STYLE.get(method, ("o", None))
            if shown.startswith("FLoRIST-"):
                marker, colour = ("*", "crimson") if shown.startswith("FLoRIST-O") else ("P", "darkorange")
            ax.plot(*zip(*points), marker=marker, color=colour, label=shown)
        ax.set_xlabel("round (0: base model)")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} per round ({'higher' if higher else 'lower'} is better)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{run.name}: progress over rounds", weight="bold")
    return fig


PLOTS = {  # file suffix -> (figure maker, caption)
    "tradeoff": (
        plot_tradeoff,
        "Quality against total download. Grey band: the Pareto front over every method and τ; "
        "circles: FLoRIST's τ sweep (colour: τ); red rings: FLoRIST-O and FLoRIST-E.",
    ),
    "ranks": (plot_ranks, "Rank FLoRIST kept per layer and module at every τ (last round)."),
    "spectra": (
        plot_spectra,
        "Singular values of the exact aggregated update ΔW (round 1) for a few modules, "
        "with the rank each τ keeps (dashed) and the cumulative energy (orange, right axis).",
    ),
    "rounds": (plot_rounds, "Accuracy and held-out loss per round for the baselines and FLoRIST-O/E."),
}


# --- markdown ----------------------------------------------------------------------------------------------------


def describe_setup(run: Run) -> list[str]:
    """A few lines on what was run, from its config.toml."""
    c = run.config
    if not c:
        return ["(no config.toml)"]
    model, data, lora = c.get("model", {}), c.get("data", {}), c.get("lora", {})
    train, fed, ev = c.get("train", {}), c.get("federation", {}), c.get("eval", {})
    ranks = lora.get("ranks", [16])
    length = f"{train['max_steps']} step(s)" if train.get("max_steps") else f"{train.get('epochs', 1):g} epoch(s)"
    lines = [
        f"- model: `{model.get('name') or 'smollm2-135m (embedded default)'}`, compute dtype {model.get('dtype', '?')}",
        f"- data: `{data.get('train', '?')}`, {data.get('clients', '?')} clients"
        + (f", at most {data['max_examples_per_client']} examples each" if data.get("max_examples_per_client") else "")
        + f", cutoff {data.get('cutoff', '?')} tokens",
        f"- LoRA ranks: {', '.join(map(str, ranks))} ({'heterogeneous' if len(set(ranks)) > 1 else 'homogeneous'}), "
        f"α = {lora.get('alpha_per_rank', 2.0):g}·r, modules {_targets(lora.get('target_modules', []))}",
        f"- training: {fed.get('rounds', 1)} round(s) × {length}, batch {train.get('batch_size', '?')} "
        f"(micro {train.get('micro_batch_size', '?')}), lr {train.get('lr', '?')}, scheme {fed.get('scheme', 'merge')}",
        f"- methods: {', '.join(METHOD_NAMES.get(m, m) for m in fed.get('methods', []))}; "
        f"τ = {fed.get('thresholds', '?')}",
    ]
    questions = ev.get("questions", "builtin")
    if questions != "none":
        limit = f" (first {ev['limit']})" if ev.get("limit") else ""
        lines.append(f"- accuracy: `{questions}`{limit}, {ev.get('mode', 'option')} mode")
    heldout = heldout_source(ev.get("heldout", ""), data.get("train", "builtin"))
    if heldout == "builtin":
        lines.append("- held-out loss: the built-in facts' test questions, answer tokens only")
    elif heldout:
        lines.append(f"- held-out loss: `{heldout}`")
    return lines


def describe_training(run: Run) -> list[str]:
    lines = []
    for group, g in sorted(run.training.items()):
        rate = g["tokens"] / g["seconds"] if g["seconds"] else float("nan")
        lines.append(
            f"- client training `{group}`: {g['clients']} client-rounds, {g['steps']} steps, "
            f"{g['tokens']:,} tokens in {g['seconds']:.0f} s ({rate:.0f} tokens/s)"
        )
    server = [r["server_seconds"] for r in run.records if r["round"] > 0]
    if server:
        lines.append(f"- server aggregation: {sum(server):.2f} s over {len(server)} branch-rounds")
    seconds = [r["evaluation"].get("seconds") for r in run.records if r["evaluation"].get("seconds") is not None]
    if seconds:
        lines.append(f"- question scoring: {sum(seconds):.0f} s over {len(seconds)} evaluations")
    return lines


def summarize(run: Run) -> list[str]:
    """Plain statements the table supports: FLoRIST-O/E against the best baseline and against FedIT's Eff."""
    lines = []
    base = run.base or {}
    n = base.get("n_questions")
    if base.get("accuracy") is not None:
        line = f"- base model before fine-tuning: accuracy {100 * base['accuracy']:.2f}%"
        if n:
            half_width = 196 * math.sqrt(0.25 * 0.75 / n)
            line += (
                f" on {n} questions; at chance (25%) a 95% interval is ±{half_width:.1f} points, "
                "so smaller differences between methods are noise"
            )
        lines.append(line)
    if base.get("heldout_loss") is not None:
        lines.append(f"- base model held-out loss: {base['heldout_loss']:.4f}")
    baselines = [r for r in run.table if r.method != "florist"]
    fedit = next((r for r in baselines if r.method == "fedit"), None)
    metrics = _metrics(run)
    for position, (attribute, label, higher) in enumerate(metrics):
        scored = [r for r in baselines if _value(r, attribute) is not None]
        if not scored:
            continue
        best = (max if higher else min)(scored, key=lambda r: _value(r, attribute))
        # FLoRIST-O/E are picked on the first metric; on the others, FLoRIST's best tau is the fair comparison
        if position == 0:
            candidates = [(pick, run.pick(pick)) for pick in PICKS]
        else:
            sweep = [r for r in run.sweep_rows() if _value(r, attribute) is not None]
            top = (max if higher else min)(sweep, key=lambda r: (_value(r, attribute), -r.eff_e4)) if sweep else None
            candidates = [(f"FLoRIST's best τ on {label.split(' (')[0]}", top)]
        for name, r in candidates:
            if r is not None and _value(r, attribute) is not None:
                lines.append(_comparison(label, name, r, best, fedit, attribute, higher))
    return lines


def _comparison(
    label: str, name: str, r: ResultRow, best: ResultRow, fedit: ResultRow | None, attribute: str, higher: bool
) -> str:
    gap = _value(r, attribute) - _value(best, attribute)
    ahead = gap >= 0 if higher else gap <= 0
    unit = " points" if attribute == "accuracy" else ""
    text = (
        f"- {label.split(' (')[0]}: {name} (τ={format_tau(r.threshold)}) {_value(r, attribute):.4g} vs best baseline "
        f"{display_name(best)} {_value(best, attribute):.4g} ({gap:+.3g}{unit}: "
        f"{'at least as good' if ahead else 'worse'})"
    )
    if fedit is not None and fedit.eff_e4:
        text += f"; Eff {r.eff_e4:.2f} = {r.eff_e4 / fedit.eff_e4:.2f}× FedIT's"
    return text


def run_section(run: Run, plots: dict[str, str], level: str = "##") -> str:
    parts = [f"{level} {run.name}", "", f"Run directory: `{run.path}`", "", *describe_setup(run), ""]
    training = describe_training(run)
    if training:
        parts += ["Measured cost:", "", *training, ""]
    parts += [
        f"{level}# Results",
        "",
        "Baselines, then FLoRIST-O (best τ) and FLoRIST-E (least download within "
        f"{run.tolerance:g} of the best). **Bold**: best, *italic*: second best among these rows. "
        "Accuracy and held-out loss: last round; Eff (×10⁻⁴) = 10⁴ / Σ rank sent down, last round; "
        "params and MB: summed over clients and rounds (float32).",
        "",
        to_markdown(run.compared_rows(), paper_names=True).rstrip(),
        "",
    ]
    summary = summarize(run)
    if summary:
        parts += ["Summary:", "", *summary, ""]
    sweep = run.sweep_rows()
    if sweep:
        sweep_table = to_markdown(sweep, marks=False, paper_names=True).rstrip()
        parts += [f"{level}# FLoRIST τ sweep", "", "Every τ (unmarked).", "", sweep_table, ""]
    for key, file in plots.items():
        parts += [f"![{run.name} {key}]({file})", "", f"*{PLOTS[key][1]}*", ""]
    return "\n".join(parts)


def combined_table(runs: Sequence[Run]) -> str:
    """Every run's compared rows in one table, marked within each run."""
    header = "| run | method | τ | accuracy (%) | held-out loss | Eff (×10⁻⁴) | MB down |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        for line in to_markdown(run.compared_rows(), paper_names=True).splitlines()[2:]:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            method, tau, acc, loss, eff, mb_down = cells[0], cells[1], cells[2], cells[3], cells[4], cells[9]
            lines.append(f"| {run.name} | {method} | {tau} | {acc} | {loss} | {eff} | {mb_down} |")
    return "\n".join(lines) + "\n"


# --- writing -----------------------------------------------------------------------------------------------------


@dataclass
class Report:
    markdown: str
    images: dict[str, bytes]  # path relative to the output folder -> PNG


def build_report(runs: Sequence[Run], title: str | None = None, plots: bool = True) -> Report:
    """The whole report in memory: markdown and (with ``plots``) every PNG."""
    names = _unique_names(runs)
    images: dict[str, bytes] = {}
    sections = []
    for run, slug in zip(runs, names):
        files = {}
        for key, (make, _) in PLOTS.items() if plots else ():
            fig = make(run)
            if fig is not None:
                files[key] = f"plots/{slug}-{key}.png"
                images[files[key]] = _png(fig)
        sections.append(run_section(run, files, "##"))
    today = datetime.date.today().isoformat()
    head = [
        f"# {title or 'FLoRIST results'}",
        "",
        f"Generated by `florist report` on {today} from {len(runs)} run director{'y' if len(runs) == 1 else 'ies'}.",
        "",
    ]
    if len(runs) > 1:
        head += [
            "## All runs",
            "",
            "Baselines and FLoRIST-O/E of every run; marks compare rows within a run.",
            "",
            combined_table(runs).rstrip(),
            "",
        ]
    return Report("\n".join(head + sections).rstrip() + "\n", images)


def _unique_names(runs: Sequence[Run]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for run in runs:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", run.name).strip("-") or "run"
        seen[slug] = seen.get(slug, 0) + 1
        names.append(slug if seen[slug] == 1 else f"{slug}-{seen[slug]}")
    return names


def write_report(
    run_dirs: Sequence[str | Path], output: str | Path | None = None, title: str | None = None, plots: bool = True
) -> Path:
    """Read every run, render, then write ``report.md`` and ``plots/*.png`` under ``output``
    (default: the first run directory). Returns the path of report.md."""
    if not run_dirs:
        raise ReportError("no run directory given")
    runs = [load_run(p) for p in run_dirs]
    report = build_report(runs, title, plots)
    out = Path(output) if output is not None else runs[0].path
    check_targets(out, [*report.images, "report.md"])
    # a failure past the checks (a full disk) is the writer's one-line WriteError
    for relative, png in report.images.items():
        atomic_write_bytes(out / relative, png)
    atomic_write_text(out / "report.md", report.markdown)  # last: it never points at plots not yet written
    return out / "report.md"


def check_targets(out: Path, files: Sequence[str]) -> None:
    """Before anything is written: each file (relative to ``out``) is a regular file or not there yet, and the
    nearest folder on its way that exists is a writable folder. A ``report.md`` that is a directory or a ``plots``
    (or ``out`` itself) that is a file is refused here, with nothing written."""
    for relative in files:
        target = out / relative
        kind = path_kind(target, ReportError)
        if kind not in (None, "file"):
            what = "a directory" if kind == "dir" else "not a regular file"
            raise ReportError(f"{target}: exists and is {what}; cannot write the report there")
        existing = next(p for p in target.parents if path_kind(p, ReportError) is not None)
        if path_kind(existing, ReportError) != "dir":
            raise ReportError(f"{existing}: exists and is not a directory; cannot write {target}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ReportError(f"{existing}: not writable; cannot write {target}")
