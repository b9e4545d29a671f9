#!/usr/bin/env python
"""Renders the benchmark tables of docs/benchmarks.md (and the main job's in README.md and docs/commands.md) from
the JSON files the benchmarks write.

Each table sits between two markers named after it, and everything between them is rendered:

    <!-- bench:train -->
    (rendered from bench/results/train.json)
    <!-- /bench:train -->

    python bench/render.py            # rewrite every document's blocks from bench/results/*.json
    python bench/render.py --check    # exit 1 if a block differs from what the JSON gives

A JSON file that does not exist yet leaves its blocks as they are, and says so. Reads JSON only: no torch.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
COMMANDS = ROOT / "docs" / "commands.md"
METHODS_DOC = ROOT / "docs" / "methods.md"
PEER_DOC = ROOT / "docs" / "peer.md"

MARKER = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->", re.DOTALL)
OPENING = re.compile(r"<!-- /?bench:(?P<name>[\w-]+) -->")

Results = dict[str, dict]  # file stem ("train") -> what the benchmark wrote
SPEEDUP_TARGET = 1.5  # florist-bf16's training throughput against the reference code's
LETTER_TARGET = 10  # letter scoring's question rate against generation


class RenderError(ValueError):
    """A document or JSON file that cannot be rendered; the message names it."""


@dataclass(frozen=True)
class Block:
    source: str  # the JSON file's stem under bench/results: the block is skipped while it does not exist
    render: Callable[[Results], str]


# ---------------------------------------------------------------- markdown


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1) -> str:
    """A markdown table; columns from ``right_from`` on are right-aligned (numbers)."""
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(x: float) -> str:
    """A speed ratio: two digits below 1 (0.38), one decimal above (4.2)."""
    return f"{x:.2f}" if x < 1 else f"{x:.1f}"


def integer(x: float) -> str:
    return f"{x:,.0f}"


# ---------------------------------------------------------------- bench/train.py


def train_table(results: Results) -> str:
    data = results["train"]
    runs, peaks, args = data["runs"], data["peaks"], data["args"]
    reference = runs.get("reference")
    rows = []
    for name, run in runs.items():
        dtype = "bfloat16" if "bf16" in name else "float32"
        peak = peaks[dtype]["gflops_cpu"]
        speedup = run["tokens_per_s_wall"] / reference["tokens_per_s_wall"] if reference else None
        rows.append(
            [
                name,
                integer(run["real_tokens"]),
                f"{1 - run['real_tokens'] / run['computed_tokens']:.0%}",
                f"{run['wall']:.1f}",
                integer(run["tokens_per_s_wall"]),
                "" if speedup is None else f"{speedup:.2f}",
                integer(run["gflops"]["executed_cpu"]),
                f"{run['executed_share_of_peak_cpu']:.1%} of {peak:.0f} ({dtype})",
                integer(run["peak_extra_mib"]),
            ]
        )
    header = [
        "variant",
        "real tokens",
        "padding",
        "wall s",
        "tokens/s",
        "× reference",
        "executed GFLOP/s",
        "% of matmul peak (same dtype)",
        "peak extra MiB",
    ]
    lines = [
        f"Machine: {data['machine']}; after: {data['load_after']}.",
        "",
        f"Workload: the first {args['examples']} examples of `{Path(args['data']).name}`, cutoff {args['cutoff']}, "
        f"batch {args['batch_size']} (micro-batch {args['micro_batch_size']}), {args['steps']} steps, "
        f"r = {args['rank']}, lr {args['lr']}, {args['threads']} threads; "
        f"N = {data['n_params'] / 1e6:.1f} M parameters.",
        "",
        table(header, rows),
        "",
        *train_findings(data),
    ]
    return "\n".join(lines)


def train_findings(data: dict) -> list[str]:
    runs, peaks = data["runs"], data["peaks"]
    lines = [
        "- Matrix-multiply peaks (best of before and after the runs, GFLOP/s per CPU-second): "
        + ", ".join(
            f"{key} {peak['gflops_cpu']:.0f} ({'×'.join(map(str, peak['shape']))})" for key, peak in peaks.items()
        )
        + "."
    ]
    if "ratio_wall" in data:
        verdict = "met" if min(data["ratio_wall"], data["ratio_cpu"]) >= SPEEDUP_TARGET else "NOT met"
        lines.append(
            f"- florist-bf16 against the reference: **{data['ratio_wall']:.2f}×** in wall time, "
            f"{data['ratio_cpu']:.2f}× in CPU time (target {SPEEDUP_TARGET}×: {verdict})."
        )
    if "florist-fp32" in runs and "florist-bf16" in runs:
        gain = runs["florist-bf16"]["tokens_per_s_wall"] / runs["florist-fp32"]["tokens_per_s_wall"]
        lines.append(f"- bfloat16 against float32, the same trainer: {gain:.2f}× the tokens/s.")
    for name, run in runs.items():
        dtype = "bfloat16" if "bf16" in name else "float32"
        share = run["executed_share_of_peak_cpu"]
        lines.append(
            f"- {name}: {share:.1%} of the {dtype} peak (target one half: {'met' if share >= 0.5 else 'NOT met'}), "
            f"{run['executed_share_of_model_shape_cpu']:.1%} of the rate at the model's own MLP shape; "
            f"{run['gflops']['model_6nt_cpu']:.0f} GFLOP/s in model FLOPs (6·N a real token)."
        )
    if "reference" in runs and "florist-bf16" in runs:
        ref, bf16 = runs["reference"]["peak_extra_mib"], runs["florist-bf16"]["peak_extra_mib"]
        lines.append(f"- Peak extra memory: the reference {integer(ref)} MiB, {ref / bf16:.1f}× florist-bf16's.")
    return lines


def train_losses(results: Results) -> str:
    data = results["train"]
    shown = {"florist-fp32": "float32", "florist-bf16": "bfloat16"}
    runs = {label: data["runs"][name]["losses"] for name, label in shown.items() if name in data["runs"]}
    steps = max(len(losses) for losses in runs.values())
    header = ["step", *(str(i + 1) for i in range(steps))]
    rows = [[label, *(f"{x:.4f}" for x in losses)] for label, losses in runs.items()]
    lines = [table(header, rows)]
    if "loss_max_relative_gap" in data:
        lines += ["", f"Largest relative difference between the two: {data['loss_max_relative_gap']:.2%}."]
    return "\n".join(lines)


# ---------------------------------------------------------------- bench/eval.py


def eval_table(results: Results) -> str:
    data = results["eval"]
    runs, args = data["results"], data["args"]
    generative = [g for g in ("generate", "generate-unbatched") if g in runs]
    header = [
        "protocol",
        "questions",
        "mean prompt tokens",
        "wall s",
        "q/s",
        *(f"× {g}" for g in generative),
        "accuracy (macro)",
    ]
    rows = [
        [
            r["protocol"],
            integer(r["questions"]),
            f"{r['mean_prompt_tokens']:.0f}",
            f"{r['wall']:.1f}",
            f"{r['q_per_s_wall']:.2f}",
            *(ratio(r["q_per_s_wall"] / runs[g]["q_per_s_wall"]) for g in generative),
            f"{100 * r['accuracy']:.2f}%",
        ]
        for r in runs.values()
    ]
    lines = [
        f"Machine: {data['machine']}.",
        "",
        f"Questions: `{Path(args['questions']).name}`, batch {args['batch_size']}, {args['dtype']} compute, "
        f"{args['threads']} threads; the generative protocols on the first {args['generate_limit']} questions.",
        "",
        table(header, rows),
        "",
        *eval_findings(data, results.get("train", {})),
    ]
    return "\n".join(lines)


def eval_findings(data: dict, train: dict) -> list[str]:
    """The scorer's speed-ups, and its rate in FLOPs where bench/train.py gave the model's size and the peak."""
    runs = data["results"]
    letter = runs.get("letter")
    if letter is None:
        return []
    lines = []
    for g in ("generate-unbatched", "generate"):
        if g in runs:
            speedup = letter["q_per_s_wall"] / runs[g]["q_per_s_wall"]
            verdict = "met" if speedup >= LETTER_TARGET else "NOT met"
            lines.append(
                f"- Letter scoring: **{ratio(speedup)}×** the rate of {g} (target {LETTER_TARGET}×: {verdict})."
            )
    if train.get("n_params"):  # the embedded model's size, as bench/train.py measured it
        tokens = letter["questions"] * letter["mean_prompt_tokens"]
        rate = 2 * train["n_params"] * tokens / letter["wall"] / 1e9
        peak = train.get("peaks", {}).get("bfloat16", {}).get("gflops_cpu")
        lines.append(
            f"- Letter scoring gets through {integer(letter['questions'])} × {letter['mean_prompt_tokens']:.0f} "
            f"prompt tokens in {letter['wall']:.0f} s: ≈ {rate:.0f} GFLOP/s in model FLOPs (2·N a token, the "
            "shared prefix counted in full though it runs once)"
            + (f", against {peak:.0f} GFLOP/s for large bfloat16 products (`bench/train.py`)." if peak else ".")
        )
    return lines


# ---------------------------------------------------------------- bench/memory.py


def memory_table(results: Results) -> str:
    data = results["memory"]
    loaded, one, eight, args = data["loaded"], data["round_1"], data["round_8"], data["args"]
    before, base = loaded["rss_before_load_mib"], loaded["rss_loaded_mib"]
    training, further = one["peak_mib"] - base, eight["peak_mib"] - one["peak_mib"]
    per_client = further / 7
    steps, micro_batch = str(args["steps"]), f"{args['micro_batch_size']} × {args['cutoff']}"
    rows = [
        ["Python, torch, transformers, florist imported", integer(before), ""],
        [
            f"+ the base model loaded and paged in (float32 weights: {integer(loaded['weights_mib'])} MiB)",
            integer(base),
            f"{base - before:+.0f}",
        ],
        [
            "+ a round in which 1 client trains",
            integer(one["peak_mib"]),
            f"{training:+,.0f}: one client's training step (the activations of one {micro_batch} micro-batch)",
        ],
        [
            "+ a round in which all 8 clients train",
            integer(eight["peak_mib"]),
            f"{further:+,.0f}: {per_client:+.0f} MiB a further client",
        ],
    ]
    lines = [
        f"Machine: {data['machine']}.",
        "",
        f"Workload: every method ({', '.join(eight['methods'])}) on the clients of `{Path(args['data']).name}`, "
        f"{args['examples']} examples a client, {steps} step{'' if steps == '1' else 's'} of {micro_batch} tokens "
        f"each, {args['threads']} threads; each line in a fresh process.",
        "",
        table(["process", "peak resident MiB", "over the previous line"], rows),
        "",
        f"- Each further client costs {per_client:.0f} MiB, {per_client / loaded['weights_mib']:.2f}× the "
        f"{loaded['weights_mib']:.0f} MiB a `copy.deepcopy` of the model would cost.",
        f"- Round wall time: {one['wall']:.0f} s with 1 client, {eight['wall']:.0f} s with 8.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- bench/aggregation.py


def aggregation_table(results: Results) -> str:
    data = results["aggregation"]
    header, rows = data["table"]["header"], data["table"]["rows"]
    args = data["args"]
    lines = [
        f"{data['machine']}; 1-minute load average before / after: {data['load_before']} / {data['load_after']}.",
        "",
        f"Best of {args['repeats']} runs ({args['dense_repeats']} for the dense route); `~`: the dense route timed "
        f"{args['dense_modules'] or 'all'} module(s) of each shape and was extrapolated to the model.",
    ]
    for model in dict.fromkeys(row[0] for row in rows):  # a table per model, in the order measured
        lines += ["", f"**{model}**", "", table(header[1:], [row[1:] for row in rows if row[0] == model], 3)]
    sizes = data["sizes"]
    lines += [
        "",
        "Working set per module (float32): FLoRIST decomposes the stacks, the dense route the m×n update.",
        "",
        table(sizes["header"], sizes["rows"], 2),
    ]
    cli = data.get("cli")  # written since the CLI cases exist
    if cli and cli["rows"]:
        lines += [
            "",
            "`florist aggregate` from a fresh process on the same factors as PEFT directories, best of "
            f"{args.get('cli_repeats', '?')} runs; ÷ dense SVD: its whole run against one dense SVD of the model's "
            "largest module, from the table above.",
            "",
            table(cli["header"], cli["rows"], 3),
        ]
    lines += ["", *(f"- {line}" for line in data["findings"])]
    return "\n".join(lines)


# ---------------------------------------------------------------- bench/peer.py


def peer_table(results: Results) -> str:
    data = results["peer"]
    args = data["args"]
    lines = [
        f"{data['machine']}; 1-minute load average before / after: {data['load_before']} / {data['load_after']}. "
        f"Their file: `{data['their_file']['name']}`, sha256 `{data['their_file']['sha256'][:16]}…`.",
        "",
        f"In-process, best of {args['repeats']} interleaved runs; errors: the worst module's "
        "‖B A − best rank-p‖ / ‖ΔW‖ against a float64 reference.",
        "",
        table(data["in_process"]["header"], data["in_process"]["rows"], 2),
    ]
    if data["fresh_process"]["rows"]:
        lines += [
            "",
            f"From a fresh process, best of {args['cli_repeats']} interleaved runs:",
            "",
            table(data["fresh_process"]["header"], data["fresh_process"]["rows"], 2),
        ]
    lines += ["", "Differences measured on their code:", "", *(f"- {line}" for line in data["differences"])]
    return "\n".join(lines)


# ---------------------------------------------------------------- bench/main_job.py


def _name(row: dict) -> str:
    """A row's method as its declaration shows it (a swept method's row by its method's name); an unknown one by its
    label."""
    from florist.methods import METHODS

    method = METHODS.get(row["label"].partition("@")[0])
    return method.display if method is not None else row["label"]


def _figure(x: float | None, digits: int) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def main_job_table(results: Results) -> str:
    data = results["main_job"]
    header = ["method", "τ", "accuracy (%)", "held-out loss", "Eff (×10⁻⁴)", "mean rank", "MB up", "MB down"]
    base = data["base"]
    rows = [["base model", "", _figure(100 * base["accuracy"], 2), _figure(base["heldout_loss"], 4), "", "", "", ""]]
    for r in data["rows"]:
        tau = "" if r["threshold"] is None else f"{r['threshold']:.2f}"
        accuracy = None if r["accuracy"] is None else 100 * r["accuracy"]
        rows.append(
            [
                _name(r),
                tau,
                _figure(accuracy, 2),
                _figure(r["heldout_loss"], 4),
                _figure(r["eff_e4"], 2),
                _figure(r["mean_rank"], 1),
                _figure(r["upload_bytes"] / 1e6, 2),
                _figure(r["download_bytes"] / 1e6, 2),
            ]
        )
    return table(header, rows, 1) + "\n\n" + main_job_cost(results)


def main_job_cost(results: Results) -> str:
    data = results["main_job"]
    groups = "; ".join(f"{g['seconds']:.0f} s for {integer(g['tokens'])} tokens" for g in data["training_groups"])
    minutes, seconds = divmod(round(data["wall_seconds"]), 60)
    machine = data["machine"].split("; load average")[0]  # the load is given before and after the run instead
    setup = data.get("setup_seconds")  # None (or absent, in older files): the job alone, on an installed .venv
    parts = (
        f", set-up included ({setup:.0f} s for `make install` in a fresh clone, {data['job_seconds']:.0f} s for "
        "the job)"
        if setup is not None
        else ", on an installed `.venv`"
    )
    return (
        f"`make run` took **{minutes} min {seconds:02d} s** ({data['wall_seconds']:.0f} s) wall{parts} on {machine}; "
        f"load average (1/5/15 min) {data['load_before']} before, {data['load_after']} after. Client training: "
        f"{groups} ({len(data['training_groups'])} training groups); {data['evaluations']} evaluations."
    )


# ---------------------------------------------------------------- bench/upload_cuts.py


def upload_cuts_table(results: Results) -> str:
    data = results["upload_cuts"]
    kept = {(b["method"], b["threshold"], b["upload_threshold"]): b["kept_rank"] for b in data["branches"]}
    header = ["method", "τ", "τ up", "kept rank", "loss, whole pairs", "loss, cut", "MB up, whole", "MB up, cut"]
    header.append("upload saving")
    rows = []
    for s in data["savings"]:
        name = _name({"label": s["method"]})
        tau = "" if s["threshold"] is None else f"{s['threshold']:.2f}"
        rank = kept.get((s["method"], s["threshold"], s["upload_threshold"]))
        rows.append(
            [
                name,
                tau,
                f"{s['upload_threshold']:.2f}",
                "" if rank is None else f"{rank:.1f}",
                f"{s['loss_whole']:.4f}",
                f"{s['loss_cut']:.4f}",
                f"{s['upload_whole'] / 1e6:.2f}",
                f"{s['upload_cut'] / 1e6:.2f}",
                f"{ratio(s['saving'])}×",
            ]
        )
    machine = data["machine"].split("; load average")[0]
    wall = f" in {data['wall_seconds']:.0f} s" if data.get("wall_seconds") else ""
    cost = (
        f"Upload thresholds {data['upload_thresholds']}, methods {data['methods']}, one training for all{wall} on "
        f"{machine}; load average {data['load_before']} before, {data['load_after']} after. Equal quality: a held-out "
        f"loss within {data['tolerance']:g} of the same method and τ with whole pairs."
    )
    return table(header, rows, 1) + "\n\n" + cost


def scale_table(results: Results) -> str:
    """Per case: the setup's seconds, round 1's, the later rounds' mean; MB down a round in round 2 against the mean of
    the last half of the rounds, MB up; the server's memory after round 1 against after the last: growth with the
    rounds shows as the second figure against the first."""
    data = results["scale"]
    header = [
        "engine",
        "clients",
        "a round",
        "rounds",
        "s setup",
        "s, round 1",
        "s a round, 2-last",
        "MB down, round 2 → last half",
        "MB up a round",
        "MiB (server), round 1 → last",
        "peak MiB (workers)",
    ]
    rows = []
    for c in data["cases"]:
        rounds = c["rounds"]
        later = rounds[1:] or rounds
        tail = rounds[len(rounds) // 2 :]
        workers = c.get("worker_peak_rss_mib")
        rows.append(
            [
                "Flower simulation" if c["engine"] == "flower" else "in-process",
                f"{c['clients']:,}",
                str(c["per_round"]),
                str(len(rounds)),
                f"{c['setup_seconds']:.1f}",
                f"{rounds[0]['seconds']:.1f}",
                f"{_mean(r['seconds'] for r in later):.1f}",
                f"{later[0]['mb_down']:.3f} → {_mean(r['mb_down'] for r in tail):.3f}",
                f"{_mean(r['mb_up'] for r in later):.3f}",
                f"{rounds[0]['rss_mib']:.0f} → {rounds[-1]['rss_mib']:.0f}",
                "" if workers is None else f"{workers:.0f}",
            ]
        )
    machine = data["machine"].split("; load average")[0]
    cost = f"On {machine}; load average {data['load_before']} before, {data['load_after']} after."
    return table(header, rows, 1) + "\n\n" + cost


def contention_table(results: Results) -> str:
    """Per variant: its threads, the median job alone and beside a CPU-bound neighbour, and their ratio."""
    data = results["contention"]
    header = ["variant", "settings", "torch threads", "s alone", "s beside a neighbour", "slower"]
    rows = []
    for v in data["variants"]:
        settings = ", ".join(f"`{k}={x}`" for k, x in v["settings"].items()) or "(florist's)"
        rows.append(
            [v["variant"], settings, str(v["threads"]), f"{v['quiet']:.2f}", f"{v['busy']:.2f}", f"{v['ratio']:.1f}×"]
        )
    machine = data["machine"].split("; torch threads")[0]
    cost = f"On {machine}; load average {data['load_before']} before, {data['load_after']} after."
    return table(header, rows, 2) + "\n\n" + cost


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


BLOCKS: dict[str, Block] = {
    "aggregation": Block("aggregation", aggregation_table),
    "train": Block("train", train_table),
    "train-loss": Block("train", train_losses),
    "eval": Block("eval", eval_table),
    "memory": Block("memory", memory_table),
    "main-job": Block("main_job", main_job_table),
    "main-job-cost": Block("main_job", main_job_cost),
    "upload-cuts": Block("upload_cuts", upload_cuts_table),
    "scale": Block("scale", scale_table),
    "contention": Block("contention", contention_table),
    "peer": Block("peer", peer_table),
}
# the blocks each document holds, each exactly once
DOCUMENTS: dict[Path, tuple[str, ...]] = {
    DOC: ("aggregation", "train", "train-loss", "eval", "memory", "scale", "contention"),
    README: ("main-job",),
    COMMANDS: ("main-job-cost",),
    METHODS_DOC: ("upload-cuts",),
    PEER_DOC: ("peer",),
}


# ---------------------------------------------------------------- the document


def load_results(directory: Path) -> Results:
    """Every ``*.json`` under ``directory`` by stem; a file that is not a JSON object is an error naming it."""
    results = {}
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RenderError(f"{path}: {e}") from None
        if not isinstance(data, dict):
            raise RenderError(f"{path}: expected a JSON object, got {type(data).__name__}")
        results[path.stem] = data
    return results


def render_doc(
    text: str,
    results: Results,
    directory: Path,
    say: Callable[[str], None] = print,
    names: Sequence[str] = DOCUMENTS[DOC],
) -> str:
    """``text`` with every block rendered from ``results``; a block whose JSON is missing is kept as it is.

    Every block of ``names`` (the document's, ``DOCUMENTS``) must be in ``text`` exactly once, and every marker in
    ``text`` must be one of them.
    """
    found = [m["name"] for m in MARKER.finditer(text)]
    markers = [m["name"] for m in OPENING.finditer(text)]
    unknown = sorted(set(markers) - set(names))
    if unknown:
        raise RenderError(f"unknown block {unknown[0]!r}; the blocks are {', '.join(names)}")
    if len(markers) != 2 * len(found):
        raise RenderError("a bench marker is not closed (each block is <!-- bench:NAME --> … <!-- /bench:NAME -->)")
    for name in names:
        if found.count(name) != 1:
            raise RenderError(f"block {name!r} appears {found.count(name)} times; it must appear once")

    def rendered(match: re.Match) -> str:
        name = match["name"]
        block = BLOCKS[name]
        if block.source not in results:
            say(
                f"{directory / (block.source + '.json')} does not exist: block {name!r} is left as it is "
                f"(run bench/{block.source}.py to write it)"
            )
            return match[0]
        try:
            body = block.render(results).strip("\n")
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise RenderError(
                f"{directory / (block.source + '.json')}: cannot render block {name!r}: {type(e).__name__} {e}"
            ) from None
        return f"<!-- bench:{name} -->\n\n{body}\n\n<!-- /bench:{name} -->"

    return MARKER.sub(rendered, text)


def check(doc: Path = DOC, directory: Path = RESULTS, say: Callable[[str], None] = print) -> list[str]:
    """The differences between ``doc`` and its rendering, as unified-diff lines; empty when it is up to date."""
    text = doc.read_text(encoding="utf-8")
    new = render_doc(text, load_results(directory), directory, say, _names(doc))
    return list(difflib.unified_diff(text.splitlines(), new.splitlines(), str(doc), "rendered", lineterm=""))


def _names(doc: Path) -> tuple[str, ...]:
    """The blocks of one of ``DOCUMENTS`` (by resolved path; any other document: the benchmarks page's)."""
    return next((names for path, names in DOCUMENTS.items() if path.resolve() == doc.resolve()), DOCUMENTS[DOC])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a document differs from its rendering")
    parser.add_argument(
        "--doc", type=Path, help="one document (default: README.md, docs/commands.md and docs/benchmarks.md)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON files (default bench/results)")
    args = parser.parse_args(argv)
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    status = 0
    try:
        for doc in [args.doc] if args.doc else list(DOCUMENTS):
            if args.check:
                diff = check(doc, args.results, say)
                if diff:
                    print("\n".join(diff))
                    say(f"{doc} differs from bench/results: run python bench/render.py")
                    status = 1
                continue
            text = doc.read_text(encoding="utf-8")
            new = render_doc(text, load_results(args.results), args.results, say, _names(doc))
            if new != text:
                doc.write_text(new, encoding="utf-8")
                say(f"wrote {doc}")
        return status
    except (OSError, RenderError) as e:
        say(f"render: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
