"""The report's figures, drawn from a loaded ``Run``, each with its caption.

A method without a sweep is a point in its declared ``Style`` (marker and colour); a method with a sweep is a line of
points coloured by the swept value on its style's colour map, with a colour bar named after the parameter. A
method's picks are ringed. Each maker returns None when the run holds nothing it could draw.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence

from matplotlib import colormaps
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from ..methods import Method, Style, format_value
from ..results import ResultRow, display_name, is_pick, is_swept, method_of
from .runs import Run, listed, load_spectra, load_upload_spectra, measured, metric_value, picks_in_short, value_text

DPI = 110
UNREGISTERED = Style()  # how a method that is not registered is drawn
PICK_RING = "crimson"  # the captions call the rings red
PICK_OFFSETS = ((8, 10), (8, -16), (8, 24), (8, -30))  # where the labels of the ringed points go, in pick order
PICK_STYLES = (("*", "crimson"), ("P", "darkorange"), ("X", "teal"), ("h", "olive"))  # picks in the rounds plot
MARKER_WORDS = {"o": "circles", "s": "squares", "D": "diamonds", "^": "triangles", "v": "triangles", "*": "stars"}


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both less download (x) and a better metric (y), by increasing x."""
    sign = 1 if higher_is_better else -1
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * y > sign * front[-1][1]:
            front.append((x, y))
    return front


# --- quality against download -------------------------------------------------------------------------------------


def plot_tradeoff(run: Run) -> Figure | None:
    """Each measured metric against the total download: every method, every value of a sweep, the Pareto front."""
    metrics = measured(run)
    if not metrics:
        return None
    fig = Figure(figsize=(6.4 * len(metrics), 4.8), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    norms = {m.name: _norm([r.threshold for r in run.sweep_rows(m)]) for m in run.swept()}
    sweeps = {}
    for ax, metric in zip(axes, metrics):
        sweeps |= _tradeoff_panel(ax, run, *metric, norms)
    for m in run.swept():
        if m.name in sweeps:
            fig.colorbar(sweeps[m.name], ax=list(axes), label=f"{m.display} {m.sweep.name}", shrink=0.85)
    fig.suptitle(f"{run.name}: quality against communication", weight="bold")
    return fig


def _norm(values: Sequence[float]) -> Normalize:
    return Normalize(min(values), max(values) + 1e-9)


def _tradeoff_panel(ax, run: Run, attribute: str, label: str, higher: bool, norms: dict[str, Normalize]) -> dict:
    """One metric against download; returns each swept method's scatter (for its colour bar) by method name."""
    # the clients' upload cuts have their own figure (``plot_upload``): here every branch sends whole pairs up
    rows = [r for r in whole_pairs(run.table) if metric_value(r, attribute) is not None and not is_pick(r)]
    front = pareto_front([(r.download_bytes / 1e6, metric_value(r, attribute)) for r in rows], higher)
    ax.plot(*zip(*front), color="0.6", lw=5, alpha=0.35, zorder=1, label="Pareto front", drawstyle="steps-post")
    for r in rows:
        if not is_swept(r):
            style = method_of(r).style if method_of(r) is not None else UNREGISTERED
            ax.scatter(
                r.download_bytes / 1e6,
                metric_value(r, attribute),
                marker=style.marker,
                s=80,
                color=style.colour,
                edgecolor="black",
                zorder=3,
                label=display_name(r),
            )
    sweeps = {}
    for m in run.swept():
        points = sorted((r for r in rows if r.method == m.name), key=lambda r: r.threshold)
        if points:
            sweeps[m.name] = _sweep(ax, m, points, attribute, norms[m.name])
    for text, r, offset in pick_labels(run):
        if metric_value(r, attribute) is not None and r.upload_threshold == 1.0:
            _ring(ax, text, r.download_bytes / 1e6, metric_value(r, attribute), offset)
    _traffic_axes(ax, "download", label, higher)
    return sweeps


def _traffic_axes(ax, traffic: str, label: str, higher: bool) -> None:
    """A quality-against-traffic panel's scale, labels, grid and legend; ``traffic`` names the x axis."""
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel(f"{traffic}, all clients and rounds (MB, log scale)")
    ax.set_ylabel(label)
    axis = "total traffic" if "+" in traffic else traffic
    ax.set_title(f"{label.split(' (')[0]} vs {axis} ({'higher' if higher else 'lower'} is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _sweep(ax, method: Method, rows: Sequence[ResultRow], attribute: str, norm: Normalize):
    """A swept method's values as a line of points coloured by value; returns the scatter."""
    xs, ys = [r.download_bytes / 1e6 for r in rows], [metric_value(r, attribute) for r in rows]
    ax.plot(xs, ys, color="0.3", lw=0.8, zorder=2)
    return ax.scatter(
        xs,
        ys,
        c=[r.threshold for r in rows],
        cmap=method.style.colour_map,
        norm=norm,
        marker=method.style.marker,
        s=40,
        edgecolor="black",
        linewidth=0.5,
        zorder=4,
        label=f"{method.display} (colour: {method.sweep.name})",
    )


def _ring(ax, text: str, x: float, y: float, offset: tuple[int, int]) -> None:
    ax.scatter(x, y, s=220, facecolor="none", edgecolor=PICK_RING, linewidth=1.8, zorder=5)
    ax.annotate(
        text,
        (x, y),
        xytext=offset,
        textcoords="offset points",
        fontsize=9,
        color=PICK_RING,
        weight="bold",
        zorder=6,
        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
    )


def pick_labels(run: Run) -> list[tuple[str, ResultRow, tuple[int, int]]]:
    """A label per picked row, with its offset; picks of one row share a label ("A = B (τ=0.90)")."""
    same: dict[tuple[str, float | None, float], list[ResultRow]] = {}
    for r in run.picks():
        same.setdefault((r.method, r.threshold, r.upload_threshold), []).append(r)
    return [
        (f"{' = '.join(r.label for r in rows)} ({value_text(rows[0])})", rows[0], PICK_OFFSETS[k % len(PICK_OFFSETS)])
        for k, rows in enumerate(same.values())
    ]


def whole_pairs(rows: Sequence[ResultRow]) -> list[ResultRow]:
    """The rows whose clients uploaded whole pairs (upload threshold 1)."""
    return [r for r in rows if r.upload_threshold == 1.0]


def tradeoff_caption(run: Run) -> str:
    swept = run.swept()
    values = "".join(f" and {name}" for name in dict.fromkeys(m.sweep.name for m in swept))
    whole = " (branches that upload whole pairs; the upload cuts have their own figure)" if run.has_cuts else ""
    parts = [f"Quality against total download{whole}. Grey band: the Pareto front over every method{values}"]
    for m in swept:
        points = MARKER_WORDS.get(m.style.marker, "points")
        parts.append(f"{points}: {m.display}'s {m.sweep.name} sweep (colour: {m.sweep.name})")
    if run.picks():
        parts.append(f"red rings: {listed([r.label for r in run.picks()])}")
    return "; ".join(parts) + "."


# --- two-way compression: quality against total traffic ---------------------------------------------------------

UPLOAD_MAP = "plasma"  # the colour of a row's upload threshold


def plot_upload(run: Run) -> Figure | None:
    """Each measured metric against the total traffic (up + down): every branch of every upload threshold, coloured by
    it, with the Pareto front over the whole grid; None for a run whose clients sent whole pairs."""
    metrics = measured(run)
    if not metrics or not run.has_cuts:
        return None
    rows = [r for r in run.table if not is_pick(r)]
    norm = _norm([r.upload_threshold for r in rows])
    fig = Figure(figsize=(6.4 * len(metrics), 4.8), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (attribute, label, higher) in zip(axes, metrics):
        scored = [r for r in rows if metric_value(r, attribute) is not None]
        total = lambda r: (r.upload_bytes + r.download_bytes) / 1e6  # noqa: E731
        front = pareto_front([(total(r), metric_value(r, attribute)) for r in scored], higher)
        ax.plot(*zip(*front), color="0.6", lw=5, alpha=0.35, zorder=1, label="Pareto front", drawstyle="steps-post")
        for method in dict.fromkeys(r.method for r in scored):
            mine = [r for r in scored if r.method == method]
            style = method_of(mine[0]).style if method_of(mine[0]) is not None else UNREGISTERED
            scatter = ax.scatter(
                [total(r) for r in mine],
                [metric_value(r, attribute) for r in mine],
                c=[r.upload_threshold for r in mine],
                cmap=UPLOAD_MAP,
                norm=norm,
                marker=style.marker,
                s=50,
                edgecolor="black",
                linewidth=0.5,
                zorder=3,
                label=display_name(mine[0]),
            )
        for text, r, offset in pick_labels(run):
            if metric_value(r, attribute) is not None:
                _ring(ax, text, total(r), metric_value(r, attribute), offset)
        _traffic_axes(ax, "upload + download", label, higher)
    fig.colorbar(scatter, ax=list(axes), label="τ up (upload threshold)", shrink=0.85)
    fig.suptitle(f"{run.name}: quality against upload and download", weight="bold")
    return fig


def upload_caption(run: Run) -> str:
    return (
        "Quality against total traffic, upload and download, for every branch at every upload threshold τ up (colour;"
        " markers by method). Grey band: the Pareto front over the whole grid"
        + (f"; red rings: {listed([r.label for r in run.picks()])}" if run.picks() else "")
        + "."
    )


def plot_upload_spectra(run: Run) -> Figure | None:
    """Each client's upload spectrum in round 1, as cumulative energy, for a few modules; None without cuts."""
    spectra = load_upload_spectra(run)
    if not spectra:
        return None
    modules = spectra_modules(sorted(next(iter(spectra.values()))))
    fig = Figure(figsize=(3.4 * len(modules), 3.4), layout="constrained")
    axes = fig.subplots(1, len(modules), squeeze=False)[0]
    colours = _colours(len(spectra), "tab10")
    for ax, name in zip(axes, modules):
        for colour, (client, by_module) in zip(colours, sorted(spectra.items())):
            squares = [v * v for v in by_module.get(name, [])]
            total = sum(squares) or 1.0
            energy = [sum(squares[: k + 1]) / total for k in range(len(squares))]
            ax.plot(range(1, len(energy) + 1), energy, marker=".", color=colour, label=f"client {client}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("components kept")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("share of the update's energy")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{run.name}: each client's upload spectrum (round 1)", weight="bold")
    return fig


def upload_spectra_caption(run: Run) -> str:
    return (
        "Each client's update in round 1, as the share of its energy its leading components carry, for a few modules:"
        " a client cut at τ up keeps the components up to where its curve reaches τ up."
    )


# --- ranks kept ---------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"layers?\.(\d+)\.")


def split_module(name: str) -> tuple[int | None, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'q_proj'); names without a layer index -> (None, name)."""
    m = _LAYER.search(name)
    return (int(m.group(1)), name.rsplit(".", 1)[-1]) if m else (None, name)


def _ranked(run: Run) -> list[tuple[Method, dict[float, dict[str, int]]]]:
    """Each swept method with the ranks its branches kept in the last round."""
    return [(m, ranks) for m in run.swept() if (ranks := run.ranks(m))]


def plot_ranks(run: Run) -> Figure | None:
    """Heat maps of the rank each swept method kept: its values down, layers across, a panel per module kind."""
    ranked = _ranked(run)
    if not ranked:
        return None
    panels = [(m, by_value, kind) for m, by_value in ranked for kind in _kinds(by_value)]
    layers = {split_module(name)[0] for _, by_value in ranked for ranks in by_value.values() for name in ranks}
    vmax = max(max(ranks.values(), default=1) for _, by_value in ranked for ranks in by_value.values())
    # one panel per method and module kind, stacked, each as wide as its layers need
    width = min(16, max(6.5, 1.8 + 0.42 * max(len(layers - {None}), 1)))
    heights = [1.1 + 0.3 * len(by_value) for _, by_value, _ in panels]
    fig = Figure(figsize=(width, sum(heights)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (m, by_value, kind) in zip(axes, panels):
        image = _ranks_panel(ax, m, by_value, kind, vmax)
        ax.set_title(f"{kind}: rank kept" if len(ranked) == 1 else f"{m.display} {kind}: rank kept")
    fig.colorbar(image, ax=list(axes), label="rank kept (components, log colour scale)", shrink=0.9, aspect=30)
    names = listed([m.display for m, _ in ranked])
    fig.suptitle(f"{run.name}: {names}'s rank per layer and module (round {run.rounds})", weight="bold")
    return fig


def _kinds(by_value: dict[float, dict[str, int]]) -> list[str]:
    return sorted({split_module(name)[1] for ranks in by_value.values() for name in ranks})


def _ranks_panel(ax, method: Method, by_value: dict[float, dict[str, int]], kind: str, vmax: int):
    """One module kind's ranks: a row per value of the sweep (highest first), a column per layer."""
    values = sorted(by_value, reverse=True)
    columns = sorted({name for ranks in by_value.values() for name in ranks if split_module(name)[1] == kind})
    columns.sort(key=lambda m: (split_module(m)[0] is None, split_module(m)[0] or 0, m))
    grid = [[by_value[v].get(m, 0) for m in columns] for v in values]
    # log colours: a value that keeps every component would flatten the differences between the others
    image = ax.imshow(grid, aspect="auto", cmap="magma", norm=LogNorm(1, max(vmax, 2)), interpolation="nearest")
    if len(columns) * len(values) <= 1000:
        for i, row in enumerate(grid):
            for j, rank in enumerate(row):
                colour = "black" if rank > vmax**0.7 else "white"
                ax.text(j, i, str(rank), ha="center", va="center", fontsize=6, color=colour)
    ticks = [split_module(m)[0] for m in columns]
    ax.set_xticks(
        range(len(columns)),
        [str(t) if t is not None else m for t, m in zip(ticks, columns)],
        fontsize=7,
        rotation=0 if all(t is not None for t in ticks) else 90,
    )
    ax.set_yticks(range(len(values)), [format_value(v) for v in values], fontsize=7)
    ax.set_xlabel("layer" if all(t is not None for t in ticks) else "module")
    ax.set_ylabel(method.sweep.name)
    return image


def ranks_caption(run: Run) -> str:
    return " ".join(
        f"Rank {m.display} kept per layer and module at every {m.sweep.name} (last round)." for m, _ in _ranked(run)
    )


# --- spectra ------------------------------------------------------------------------------------------------------


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


def cut_values(values: Sequence[float], count: int = 5) -> list[float]:
    """At most ``count`` of a sweep's values to draw: its ends, and values evenly spaced through it between them."""
    values = sorted(values)
    if len(values) <= count:
        return values
    step = (len(values) - 1) / (count - 1)
    return sorted({values[round(i * step)] for i in range(count)})


def _cut_method(run: Run) -> Method | None:
    """The swept method whose cut-offs the spectra show: the first in the table."""
    return next(iter(run.swept()), None)


def plot_spectra(run: Run) -> Figure | None:
    """Singular values of a few modules in round 1 (as a branch saved them), with the rank the first swept method
    kept there at a few of its values."""
    spectra = load_spectra(run)
    names = spectra_modules(sorted(name for name, values in spectra.items() if any(v > 0 for v in values)))
    if not names:
        return None
    method = _cut_method(run)
    cuts = _cuts(run, method)
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(6.2 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        values = [v for v in spectra[name] if v > 0]
        _spectrum_panel(ax, name, values)
        for v, colour, ranks in cuts:
            if name in ranks:
                kept = ranks[name]
                label = f"{method.sweep.name}={format_value(v)}: keeps {kept}"
                ax.axvline(kept, color=colour, ls="--", lw=1.2, label=label)
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    cut_offs = f" and {method.display}'s cut-offs" if cuts else ""
    fig.suptitle(f"{run.name}: singular values of the exact aggregate (round 1){cut_offs}", weight="bold")
    return fig


def _cuts(run: Run, method: Method | None) -> list[tuple[float, tuple, dict[str, int]]]:
    """(value, colour, {module: rank kept in round 1}) for a few of the method's values."""
    if method is None:
        return []
    kept = run.ranks(method, round_number=1)
    values = cut_values(list(kept))
    return [(v, c, kept[v]) for v, c in zip(values, _colours(len(values), method.style.colour_map))]


def _spectrum_panel(ax, name: str, values: Sequence[float]) -> None:
    """A module's singular values (log scale) and their cumulative energy (right axis)."""
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
    ax.set_xlabel("component i")
    ax.set_ylabel("singular value σᵢ (log scale)")
    ax.set_title(name, fontsize=9)
    ax.set_xlim(0, len(values) + 1)
    ax.grid(True, alpha=0.3)


def _colours(n: int, colour_map: str) -> list:
    cmap = colormaps[colour_map]
    return [cmap(i / max(1, n - 1) * 0.9) for i in range(n)]


def spectra_caption(run: Run) -> str:
    method = _cut_method(run)
    cut_offs = f"the rank each {method.sweep.name} keeps (dashed) and " if method is not None else ""
    return (
        "Singular values of the exact aggregated update ΔW (round 1) for a few modules, "
        f"with {cut_offs}the cumulative energy (orange, right axis)."
    )


# --- rounds -------------------------------------------------------------------------------------------------------


def round_lines(run: Run, attribute: str) -> list[tuple[str, tuple[str, str | None], list[tuple[int, float]]]]:
    """(legend name, (marker, colour), metric per round) per compared row that was scored: each method without a
    sweep by its branch, then each picked branch (picks of one branch share its line); round 0 is the base model."""
    lines = []
    for r in run.compared_rows():
        if not is_pick(r):
            style = method_of(r).style if method_of(r) is not None else None
            lines.append((display_name(r), (style.marker, style.colour) if style else ("o", None), r.label))
    for k, (text, r, _) in enumerate(pick_labels(run)):
        lines.append((text, PICK_STYLES[k % len(PICK_STYLES)], method_of(r).label(r.threshold)))
    scored = [(name, style, _per_round(run, branch, attribute)) for name, style, branch in lines]
    return [line for line in scored if line[2]]


def _per_round(run: Run, branch: str, attribute: str) -> list[tuple[int, float]]:
    scale = 100 if attribute == "accuracy" else 1
    points = [
        (rec["round"], scale * rec["evaluation"][attribute])
        for rec in run.records
        if rec["branch"] == branch and rec["evaluation"].get(attribute) is not None
    ]
    base = run.base or {}
    if base.get(attribute) is not None:
        points.insert(0, (0, scale * base[attribute]))
    return sorted(points)


def round_series(run: Run, attribute: str) -> dict[str, list[tuple[int, float]]]:
    """Per compared branch, named as in the legend, its metric per round, round 0 being the base model."""
    return {name: points for name, _, points in round_lines(run, attribute)}


def plot_rounds(run: Run) -> Figure | None:
    """Each metric per round for the methods without a sweep and the swept methods' picks; only for runs of several
    rounds."""
    metrics = measured(run)
    if run.rounds < 2 or not metrics:
        return None
    fig = Figure(figsize=(6.2 * len(metrics), 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (attribute, label, higher) in zip(axes, metrics):
        for shown, (marker, colour), points in round_lines(run, attribute):
            ax.plot(*zip(*points), marker=marker, color=colour, label=shown)
        ax.set_xlabel("round (0: base model)")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} per round ({'higher' if higher else 'lower'} is better)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{run.name}: progress over rounds", weight="bold")
    return fig


def rounds_caption(run: Run) -> str:
    picks = picks_in_short(run)
    return f"Accuracy and held-out loss per round for the baselines{f' and {picks}' if picks else ''}."


# file suffix -> (figure maker, caption maker); a figure the maker returns None for is left out, caption and all
PLOTS: dict[str, tuple[Callable[[Run], Figure | None], Callable[[Run], str]]] = {
    "tradeoff": (plot_tradeoff, tradeoff_caption),
    "ranks": (plot_ranks, ranks_caption),
    "spectra": (plot_spectra, spectra_caption),
    "upload": (plot_upload, upload_caption),
    "upload-spectra": (plot_upload_spectra, upload_spectra_caption),
    "rounds": (plot_rounds, rounds_caption),
}
