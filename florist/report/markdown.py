"""The report's text: a run's setup, its measured cost, its results tables and what they say, and the table of
several runs together.

Baselines are the rows of methods without a sweep; a swept method's picks are compared with the best of them, and
each sweep gets a table of every value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..config import heldout_source
from ..methods import METHODS, Method, format_value, in_order
from ..results import ResultRow, display_name, is_pick, to_markdown, value_header
from .plots import PLOTS
from .runs import Run, listed, measured, metric_value, setting, settings, value_text


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
        f"- methods: {', '.join(_display(m) for m in fed.get('methods', []))}"
        + "".join(f"; {sweep.name} = {setting(c, key)}" for key, sweep in _sweeps(fed.get("methods", [])).items())
        + (f"; τ up = {cuts}" if (cuts := str(fed.get("upload_thresholds", "1"))) not in ("1", "1.0") else ""),
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


def _sweeps(names) -> dict:
    """The swept parameters of the run's methods (every registered method's where the config names none), once each
    (FLoRIST and FLoRIST-SA sweep the same τ), by config key."""
    run = set(names)
    return {m.sweep.config_key: m.sweep for m in in_order() if m.sweep is not None and (m.name in run or not run)}


def _display(name: str) -> str:
    """A method's display name, or its key where it is not registered."""
    return METHODS[name].display if name in METHODS else name


def _targets(targets) -> str:
    """``lora.target_modules`` as the config gave it: a regex as it is, a list of names joined."""
    return targets if isinstance(targets, str) else ", ".join(targets)


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
    """Plain statements the table supports: each pick against the best baseline, and its Eff against that of the
    first registered method without a sweep (when it ran)."""
    lines = _base_model(run.base or {})
    baselines = run.baselines()
    reference = _reference(run)
    for position, (attribute, label, higher) in enumerate(measured(run)):
        scored = [r for r in baselines if metric_value(r, attribute) is not None]
        if not scored:
            continue
        best = (max if higher else min)(scored, key=lambda r: metric_value(r, attribute))
        # the picks are made on the first metric; on the others, each sweep's best value is the fair comparison
        if position == 0:
            candidates = [(r.label, r) for r in run.picks()]
        else:
            metric = label.split(" (")[0]
            candidates = [
                (f"{m.display}'s best {m.sweep.name} on {metric}", _best_value(run, m, attribute, higher))
                for m in run.swept()
            ]
        for name, r in candidates:
            if r is not None and metric_value(r, attribute) is not None:
                lines.append(_comparison(label, name, r, best, reference, attribute, higher))
    return lines


def _base_model(base: dict) -> list[str]:
    lines = []
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
    return lines


def _reference(run: Run) -> ResultRow | None:
    """The baseline Eff is measured against: the row of the first registered method without a sweep, in table
    order, when the run has it."""
    first = next((m for m in in_order() if m.sweep is None), None)
    return next((r for r in run.baselines() if first is not None and r.method == first.name), None)


def _best_value(run: Run, method: Method, attribute: str, higher: bool) -> ResultRow | None:
    """The value of a sweep best on a metric; ties go to the higher Eff."""
    sweep = [r for r in run.sweep_rows(method) if metric_value(r, attribute) is not None]
    if not sweep:
        return None
    return (max if higher else min)(sweep, key=lambda r: (metric_value(r, attribute), -r.eff_e4))


def _comparison(
    label: str, name: str, r: ResultRow, best: ResultRow, reference: ResultRow | None, attribute: str, higher: bool
) -> str:
    value, best_value = metric_value(r, attribute), metric_value(best, attribute)
    gap = value - best_value
    ahead = gap >= 0 if higher else gap <= 0
    unit = " points" if attribute == "accuracy" else ""
    text = (
        f"- {label.split(' (')[0]}: {name} ({value_text(r)}) {value:.4g} vs best baseline "
        f"{display_name(best)} {best_value:.4g} ({gap:+.3g}{unit}: {'at least as good' if ahead else 'worse'})"
    )
    if reference is not None and reference.eff_e4:
        text += f"; Eff {r.eff_e4:.2f} = {r.eff_e4 / reference.eff_e4:.2f}× {display_name(reference)}'s"
    return text


def picks_described(run: Run) -> str:
    """What the rows after the baselines are: each swept method's picks, as the method describes them
    (``describe_picks(config)``, where it declares one), else by their labels."""
    parts = []
    for m in run.swept():
        describe = getattr(m, "describe_picks", None)  # optional: a method's own words for how it picks
        labels = [r.label for r in run.picks(m)]
        if describe is not None and (text := describe(settings(run.config))):
            parts.append(text)
        elif labels:
            parts.append(f"{listed(labels)} ({m.display}'s picks among its {m.sweep.name})")
    return listed(parts)


def run_section(run: Run, plots: dict[str, str], level: str = "##") -> str:
    parts = [f"{level} {run.name}", "", f"Run directory: `{run.path}`", "", *describe_setup(run), ""]
    training = describe_training(run)
    if training:
        parts += ["Measured cost:", "", *training, ""]
    picks = picks_described(run)
    parts += [
        f"{level}# Results",
        "",
        f"Baselines{f', then {picks}' if picks else ''}. **Bold**: best, *italic*: second best among these rows. "
        "Accuracy and held-out loss: last round; Eff (×10⁻⁴) = 10⁴ / Σ rank sent down, last round; "
        "params and MB: summed over clients and rounds (float32).",
        "",
        to_markdown(run.compared_rows(), paper_names=True).rstrip(),
        "",
    ]
    summary = summarize(run)
    if summary:
        parts += ["Summary:", "", *summary, ""]
    for m in run.swept():
        sweep_table = to_markdown(run.sweep_rows(m), marks=False, paper_names=True).rstrip()
        name = m.sweep.name
        parts += [f"{level}# {m.display} {name} sweep", "", f"Every {name} (unmarked).", "", sweep_table, ""]
    if run.has_cuts:
        parts += [f"{level}# Upload cuts", "", *upload_cuts(run), ""]
    for key, file in plots.items():
        parts += [f"![{run.name} {key}]({file})", "", f"*{PLOTS[key][1](run)}*", ""]
    return "\n".join(parts)


def upload_cuts(run: Run) -> list[str]:
    """Per branch, what its clients' upload cut kept and saved, beside the same method and value sending whole pairs."""
    lines = [
        "Each branch at every upload threshold τ up (1: whole pairs): the mean rank its clients kept in round 1 (over "
        "clients and modules), its traffic, its quality, and its upload as a share of the same branch's at τ up = 1.",
        "",
        "| branch | τ up | kept rank | MB up | MB down | MB total | held-out loss | accuracy (%) | upload vs τ up 1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [r for r in run.table if not is_pick(r)]
    whole = {(r.method, r.threshold): r for r in rows if r.upload_threshold == 1.0}
    for r in sorted(rows, key=lambda r: (r.method, r.threshold or 0, -r.upload_threshold)):
        ranks = [p for client in run.upload_ranks(r.label) for p in client.values()]
        kept = f"{sum(ranks) / len(ranks):.1f}" if ranks else ""
        base = whole.get((r.method, r.threshold))
        share = f"{r.upload_bytes / base.upload_bytes:.2f}" if base is not None and base.upload_bytes else ""
        loss = "" if r.heldout_loss is None else f"{r.heldout_loss:.4f}"
        accuracy = "" if r.accuracy is None else f"{100 * r.accuracy:.2f}"
        up, down = r.upload_bytes / 1e6, r.download_bytes / 1e6
        lines.append(
            f"| {r.label} | {format_value(r.upload_threshold)} | {kept} | {up:.2f} | {down:.2f} | {up + down:.2f} | "
            f"{loss} | {accuracy} | {share} |"
        )
    return lines


def combined_table(runs: Sequence[Run]) -> str:
    """Every run's compared rows in one table, marked within each run."""
    value = value_header([r for run in runs for r in run.table])
    cuts = any(run.has_cuts for run in runs)  # then rows of one method differ by τ up: show it, and the upload
    columns = ["accuracy (%)", "held-out loss", "Eff (×10⁻⁴)", *(["τ up", "MB up"] if cuts else []), "MB down"]
    header = f"| run | method | {value} | " + " | ".join(columns) + " |"
    lines = [header, "|---|---|" + "---:|" * (len(columns) + 1)]
    for run in runs:
        table = to_markdown(run.compared_rows(), paper_names=True).splitlines()
        names = [c.strip() for c in table[0].strip().strip("|").split("|")]
        wanted = [0, 1, *(names.index(c) if c in names else None for c in columns)]
        for line in table[2:]:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            lines.append(f"| {run.name} | " + " | ".join("" if k is None else cells[k] for k in wanted) + " |")
    return "\n".join(lines) + "\n"
