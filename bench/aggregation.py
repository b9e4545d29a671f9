#!/usr/bin/env python
"""Server-step benchmark: time and peak memory of every aggregation method on real LLM module shapes.

Each (model, ranks, method) case runs in a fresh Python process: 8 clients send random float32
LoRA factors (seeded) for every q_proj and v_proj of the model, and the case times the whole
server step, ``florist.methods.aggregate`` (validation included), over all modules.

Memory is the growth of the process's resident set during the step: the kernel's peak-RSS mark
(VmHWM) is reset just before the step and read after it, minus the RSS the process had with its
inputs built and the kernels warmed up. RSS counts everything the step touches (torch tensors,
LAPACK workspace, the output adapter), which tracemalloc cannot see.

Both wall time and the CPU time the step consumed are reported: on a machine shared with other
work the wall time grows with their load, the CPU time (at one thread) hardly does.

The CLI cases run ``florist aggregate`` on the same factors written as 8 PEFT adapter directories, from a fresh
process each time as a user runs it (start-up, reading, the step and writing, with florist's own thread settings),
and set it against one dense SVD of the model's largest module measured in the same run.

The dense route (form the m x n update, full SVD per module) is what FlexLoRA and a naive FLoRIST
do. One 4096 x 4096 SVD costs about 20 s of CPU, so dense cases time ``--dense-modules`` modules
of each distinct shape and extrapolate to the model's modules (marked ``~`` in the table).

    python bench/aggregation.py                       # all models: about 5 minutes of CPU
    python bench/aggregation.py --models tinyllama --markdown
    python bench/aggregation.py --threads 1           # on a busy machine: no thread oversubscription

Besides the tables it prints, it writes what they hold to bench/results/aggregation.json (``--json PATH``), from
which ``bench/render.py`` renders the tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from machine import cpu_model, reset_peak_rss, status_kib

from florist.adapters import write_adapter
from florist.aggregation import (
    AggregationResult,
    ClientUpdate,
    LoraFactors,
    ModuleAggregate,
    energy_rank,
    prepare,
)
from florist.aggregation.base import fold_scaling
from florist.methods import aggregate
from florist.synthetic import MODEL_SHAPES

RESULTS = Path(__file__).resolve().parent / "results"
BYTES_PER_FLOAT = 4  # float32 throughout
MIB = 2**20


@dataclass(frozen=True)
class ModelShapes:
    """The adapted modules of one model: (out, in) of q_proj and v_proj, repeated per layer."""

    title: str
    layers: int
    shapes: dict[str, tuple[int, int]]

    def modules(self) -> list[tuple[str, tuple[int, int]]]:
        return [
            (f"model.layers.{i}.self_attn.{proj}", shape)
            for i in range(self.layers)
            for proj, shape in self.shapes.items()
        ]


def _shapes(model: str) -> ModelShapes:
    """A model's q_proj and v_proj shapes from florist's one table of them (``florist.synthetic.MODEL_SHAPES``)."""
    layers, hidden, v_out = MODEL_SHAPES[model]
    return ModelShapes(MODEL_TITLES[model], layers, {"q_proj": (hidden, hidden), "v_proj": (v_out, hidden)})


MODEL_TITLES = {"tinyllama": "TinyLlama-1.1B", "llama-3.2-1b": "Llama-3.2-1B", "llama-7b": "Llama-7B"}
MODELS = {model: _shapes(model) for model in MODEL_TITLES}

# The authors' settings: 8 clients, r=16 everywhere, or heterogeneous ranks; alpha = 2r (scaling 2).
RANKS = {
    "16": (16,) * 8,
    "64,32,16,16,8,8,4,4": (64, 32, 16, 16, 8, 8, 4, 4),
}


@dataclass(frozen=True)
class MethodSpec:
    key: str  # what the worker runs: a registered method name or "dense"
    threshold: float | None = None  # FLoRIST's tau, and the dense route's

    @property
    def label(self) -> str:
        return self.key if self.threshold is None else f"{self.key} τ={self.threshold:g}"

    @property
    def dense(self) -> bool:
        """Whether the step forms m x n matrices and takes their full SVD (sampled, then extrapolated)."""
        return self.key in ("dense", "flexlora")

    @property
    def thresholds(self) -> bool:
        return self.threshold is not None


def method_specs(taus: Sequence[float]) -> list[MethodSpec]:
    florist = [MethodSpec("florist", t) for t in taus]
    return florist + [MethodSpec(m) for m in ("flora", "fedit", "flexlora", "ffa")] + [MethodSpec("dense", min(taus))]


# ---------------------------------------------------------------- inputs


def client_updates(
    modules: Sequence[tuple[str, tuple[int, int]]], ranks: Sequence[int], seed: int, shared_a: bool
) -> list[ClientUpdate]:
    """Random float32 factors, alpha = 2r. A module's factors depend only on the seed and its name,
    so the dense route's sampled modules get the same factors as in the full step.

    ``shared_a``: every client's A is the leading rows of one shared A per module, as FFA-LoRA requires.
    Factors are scaled in place so building leaves no freed temporaries for the step to reuse.
    """
    examples = torch.randint(200, 2000, (len(ranks),), generator=torch.Generator().manual_seed(seed)).tolist()
    per_client: list[dict[str, LoraFactors]] = [{} for _ in ranks]
    for name, (m, n) in modules:
        g = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
        top = torch.randn(max(ranks), n, generator=g).mul_(n**-0.5) if shared_a else None
        for k, r in enumerate(ranks):
            A = top[:r] if top is not None else torch.randn(r, n, generator=g).mul_(n**-0.5)
            B = torch.randn(m, r, generator=g).mul_(0.01)
            per_client[k][name] = LoraFactors(A=A, B=B, scaling=2.0)
    return [ClientUpdate(mods, n_k, f"client {k}") for k, (mods, n_k) in enumerate(zip(per_client, examples))]


# ---------------------------------------------------------------- timing


def clock() -> tuple[float, float]:
    """Wall and CPU time (all threads of this process) now.

    CPU time is what the step itself consumed: it does not grow when other processes take the cores,
    which makes it the steadier figure on a shared machine (with one thread; more threads add spin-waits).
    """
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


# ---------------------------------------------------------------- the dense route


SvdTimes = list[tuple[int, float, float]]  # (m * n, wall seconds, CPU seconds) of each dense SVD


def dense_route(updates: Sequence[ClientUpdate], threshold: float, svd_seconds: SvdTimes) -> AggregationResult:
    """Naive FLoRIST: form dense Delta W per module, full SVD, keep the top-p components by energy.

    The result equals FLoRIST's; the cost is FlexLoRA's. Appends each SVD's seconds to ``svd_seconds``.
    """
    prepared, weights = prepare(updates)
    modules = {}
    for name in prepared[0].modules:
        delta = sum(w * (fold_scaling(u.modules[name]) @ u.modules[name].A) for u, w in zip(prepared, weights))
        start = clock()
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        svd_seconds.append((delta.numel(), *since(start)))
        del delta
        p = energy_rank(S, threshold)
        modules[name] = ModuleAggregate(A=Vh[:p].clone(), B=U[:, :p] * S[:p], singular_values=S)
    return AggregationResult("dense", modules, weights=weights)


def server_step(spec: MethodSpec, svd_seconds: SvdTimes) -> Callable[[list[ClientUpdate]], AggregationResult]:
    if spec.key == "dense":
        return lambda updates: dense_route(updates, spec.threshold, svd_seconds)
    return lambda updates: aggregate(spec.key, updates, value=spec.threshold)


# ---------------------------------------------------------------- memory


def peak_rss_kib(resettable: bool) -> int | None:
    if resettable:
        return status_kib("VmHWM")
    if sys.platform.startswith("linux"):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; the process's lifetime peak
    return None


MEMORY_METHODS = {
    "vmhwm": "peak RSS of the step (VmHWM, reset just before it) minus RSS with inputs built",
    "ru_maxrss": "the process's peak RSS (ru_maxrss) minus RSS with inputs built (the kernel refused a peak reset)",
    None: "not measured on this platform",
}


# ---------------------------------------------------------------- one case, in its own process


@dataclass(frozen=True)
class Case:
    model: str
    ranks: str
    method: str
    threshold: float | None
    seed: int
    threads: int
    repeats: int
    dense_modules: int

    @property
    def spec(self) -> MethodSpec:
        return MethodSpec(self.method, self.threshold)


def measured_groups(case: Case) -> list[tuple[list[tuple[str, tuple[int, int]]], int]]:
    """The modules timed, in groups of one shape, each with the number of model modules it stands for.

    Factor-only methods take every module in one step. The dense route samples ``dense_modules``
    modules per distinct shape (0: all of them), one step per shape, and scales each up.
    """
    modules = MODELS[case.model].modules()
    if not case.spec.dense or case.dense_modules <= 0:
        return [(modules, len(modules))]
    shapes = sorted({shape for _, shape in modules}, key=lambda s: s[0] * s[1], reverse=True)
    groups = []
    for shape in shapes:
        of_shape = [mod for mod in modules if mod[1] == shape]
        groups.append((of_shape[: case.dense_modules], len(of_shape)))
    return groups


Inputs = list[tuple[list[ClientUpdate], int, int]]  # (updates, modules in them, model modules they stand for)


def run_case(case: Case) -> dict:
    """Build the inputs, warm the kernels on a tiny copy, then time and measure the step ``repeats`` times."""
    torch.set_num_threads(case.threads)
    ranks = RANKS[case.ranks]
    shared_a = case.method == "ffa"
    svd_seconds: SvdTimes = []
    step = server_step(case.spec, svd_seconds)

    # Warm-up: loads the kernels' code pages and thread pools, so neither counts as the step's memory.
    step(client_updates([("warm.q", (96, 128)), ("warm.v", (64, 128))], ranks, case.seed, shared_a))
    svd_seconds.clear()

    inputs = [
        (client_updates(mods, ranks, case.seed, shared_a), len(mods), total) for mods, total in measured_groups(case)
    ]
    figures = measure(step, inputs, case.repeats)
    n_modules = sum(total for _, _, total in inputs)
    sampled = sum(measured for _, measured, _ in inputs)
    return {
        **asdict(case),
        **figures,
        "modules": n_modules,
        "measured_modules": sampled,
        "extrapolated": sampled < n_modules,
        "seconds_per_module": figures["seconds"] / n_modules,
        "mean_rank": figures["mean_rank"] if case.spec.thresholds else None,
        "svd_seconds": _largest_svd_seconds(svd_seconds, 1),
        "svd_cpu_seconds": _largest_svd_seconds(svd_seconds, 2),
    }


def measure(step: Callable[[list[ClientUpdate]], AggregationResult], inputs: Inputs, repeats: int) -> dict:
    """Fastest wall and CPU time over ``repeats`` runs (scaled up from sampled modules), peak extra memory, mean rank.

    The fastest run is reported: on a shared machine the slower ones carry other processes' load, not the step's cost.
    """
    gc.collect()
    baseline = status_kib("VmRSS")
    resettable = reset_peak_rss()
    walls, cpus, peaks, kept = [], [], [], []
    for _ in range(repeats):
        wall = cpu = 0.0
        for updates, measured, total in inputs:
            gc.collect()
            reset_peak_rss()
            start = clock()
            result = step(updates)
            elapsed = since(start)
            peak = peak_rss_kib(resettable)
            wall += elapsed[0] * total / measured
            cpu += elapsed[1] * total / measured
            if peak is not None and baseline is not None:
                peaks.append(max(peak - baseline, 0) / 1024)
            kept.append((statistics.fmean(m.rank for m in result.modules.values()), total))
            del result
        walls.append(wall)
        cpus.append(cpu)
    return {
        "seconds": min(walls),
        "cpu_seconds": min(cpus),
        "peak_mib": max(peaks) if peaks else None,
        "mean_rank": _weighted_mean(kept[: len(inputs)]),
        "memory_method": ("vmhwm" if resettable else "ru_maxrss") if baseline is not None else None,
    }


def _largest_svd_seconds(svd_seconds: SvdTimes, field: int) -> float | None:
    """The fastest SVD of the largest module shape (wall: field 1, CPU: 2): the unit the factored route is
    compared with.
    """
    if not svd_seconds:
        return None
    largest = max(times[0] for times in svd_seconds)
    return min(times[field] for times in svd_seconds if times[0] == largest)


def _weighted_mean(pairs: Sequence[tuple[float, int]]) -> float:
    """Mean over the model's modules of per-group means, each group standing for ``count`` modules."""
    return sum(mean * count for mean, count in pairs) / sum(count for _, count in pairs)


def spawn(case: Case) -> dict:
    """Run one case in a fresh interpreter, so its peak memory is its own."""
    env = dict(os.environ, OMP_NUM_THREADS=str(case.threads), MKL_NUM_THREADS=str(case.threads))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--case", json.dumps(asdict(case))],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"aggregation bench: case {case.model} / {case.ranks} / {case.spec.label} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the CLI, from a fresh process


def write_client_dirs(model: str, ranks: str, seed: int, root: Path) -> tuple[list[Path], list[int]]:
    """The bench's factors for ``model`` as PEFT adapter directories under ``root`` (scaling folded into B), and the
    clients' example counts (the in-process step's weights)."""
    updates = client_updates(MODELS[model].modules(), RANKS[ranks], seed, shared_a=False)
    dirs = []
    for k, u in enumerate(updates):
        modules = {name: ModuleAggregate(A=f.A, B=fold_scaling(f)) for name, f in u.modules.items()}
        dirs.append(write_adapter(root / f"client{k}", modules, base_model=None))
    return dirs, [u.num_examples for u in updates]


def timed_process(argv: Sequence[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one fresh process running ``argv`` (which must succeed)."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child cannot fill it and stall
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            last = (err.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"aggregation bench: {' '.join(argv[:3])} ... failed: {last}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def florist_command() -> list[str]:
    """The ``florist`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("florist")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from florist.cli import main; main()"]


def cli_cases(args: argparse.Namespace) -> list[dict]:
    """``florist aggregate --method florist`` at each tau, best of ``--cli-repeats`` fresh processes, per model and
    rank setting; and the start-up alone (``import florist.cli`` in a fresh interpreter)."""
    startup = min(timed_process([sys.executable, "-c", "import florist.cli"])[0] for _ in range(args.cli_repeats))
    rows = []
    for model in args.models:
        for ranks in RANKS:
            with tempfile.TemporaryDirectory(prefix="florist-bench-") as tmp:
                dirs, counts = write_client_dirs(model, ranks, args.seed, Path(tmp))
                for tau in args.taus:
                    out = Path(tmp) / "out"
                    argv = [*florist_command(), "aggregate", *map(str, dirs), "--method", "florist"]
                    argv += ["--threshold", f"{tau:g}", "--weights", ",".join(map(str, counts)), "--output", str(out)]
                    runs = []
                    for _ in range(args.cli_repeats):
                        shutil.rmtree(out, ignore_errors=True)
                        runs.append(timed_process(argv))
                    wall, cpu, rss = min(runs)
                    rows.append(
                        {
                            "model": model,
                            "ranks": ranks,
                            "threshold": tau,
                            "seconds": wall,
                            "cpu_seconds": cpu,
                            "peak_rss_mib": rss,
                            "startup_seconds": startup,
                        }
                    )
    return rows


CLI_HEADER = ["model", "ranks", "τ", "florist aggregate s", "CPU s", "of it start-up s", "peak RSS MiB", "÷ dense SVD"]


def cli_rows(cli: Sequence[dict], results: Sequence[dict]) -> list[list[str]]:
    rows = []
    for c in cli:
        svd = _dense_svd_seconds(results, c["model"], c["ranks"])
        rows.append(
            [
                MODELS[c["model"]].title,
                c["ranks"],
                f"{c['threshold']:g}",
                f"{c['seconds']:.2f}",
                f"{c['cpu_seconds']:.2f}",
                f"{c['startup_seconds']:.2f}",
                f"{c['peak_rss_mib']:.0f}",
                "n/a" if svd is None else f"{c['seconds'] / svd:.2f}",
            ]
        )
    return rows


def _dense_svd_seconds(results: Sequence[dict], model: str, ranks: str) -> float | None:
    """The dense route's fastest SVD of the model's largest module in this run, or None where it did not run."""
    times = [r["svd_seconds"] for r in results if r["model"] == model and r["ranks"] == ranks and r["svd_seconds"]]
    return min(times) if times else None


def cli_findings(cli: Sequence[dict], results: Sequence[dict]) -> list[str]:
    """The CLI's whole run at the largest tau set against one dense SVD of the model's largest module; for a model
    with 4096 x 4096 modules (Llama-7B) against the target, a fifth of that SVD."""
    lines = []
    for c in cli:
        svd = _dense_svd_seconds(results, c["model"], c["ranks"])
        if svd is None or c["threshold"] != max(x["threshold"] for x in cli):
            continue
        model = MODELS[c["model"]]
        m, n = max(model.shapes.values(), key=lambda s: s[0] * s[1])
        ratio = c["seconds"] / svd
        target = f"; target ≤ 0.2 {'holds' if ratio <= 0.2 else 'does NOT hold'}" if m * n >= 4096 * 4096 else ""
        lines.append(
            f"{model.title}, ranks {c['ranks']}: `florist aggregate` from a fresh process at τ={c['threshold']:g} "
            f"takes {c['seconds']:.2f} s ({c['startup_seconds']:.2f} s of it starting Python, torch and florist), "
            f"{ratio:.2f} of one dense {m}×{n} SVD ({svd:.2f} s){target}."
        )
    return lines


# ---------------------------------------------------------------- report


def machine_line(threads: int) -> str:
    cpu = cpu_model()
    mem = _meminfo_gib()
    blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    return (
        f"Machine: {cpu}, {os.cpu_count()} cores{f', {mem:.1f} GiB RAM' if mem else ''}; "
        f"Python {platform.python_version()}, torch {torch.__version__} ({blas}); torch threads: {threads}"
    )


def _load() -> str:
    """The 1-minute load average: other processes' load on a shared machine slows every case."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) / 2**20
    except (OSError, StopIteration):
        return None


def result_rows(results: Sequence[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        approx = "~" if r["extrapolated"] else ""
        rows.append(
            [
                MODELS[r["model"]].title,
                r["ranks"],
                MethodSpec(r["method"], r["threshold"]).label,
                str(r["modules"]) + (f" ({r['measured_modules']} timed)" if r["extrapolated"] else ""),
                f"{approx}{r['seconds']:.3f}",
                f"{approx}{r['cpu_seconds']:.3f}",
                f"{r['seconds_per_module'] * 1000:.1f}",
                "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
                "–" if r["mean_rank"] is None else f"{r['mean_rank']:.1f}",
            ]
        )
    return rows


RESULT_HEADER = [
    "model",
    "ranks",
    "method",
    "modules",
    "step s",
    "step CPU s",
    "ms / module",
    "peak extra MiB",
    "mean kept rank",
]
SIZE_HEADER = [
    "model",
    "module (m×n)",
    "count",
    "ranks",
    "Σr",
    "stacks (m+n)·Σr MiB",
    "dense m×n MiB",
    "dense / stacks",
]


def size_rows(models: Sequence[str]) -> list[list[str]]:
    """The theoretical working sets per module: FLoRIST's stacks vs the dense update (float32)."""
    rows = []
    for key in models:
        model = MODELS[key]
        for proj, (m, n) in model.shapes.items():
            for label, ranks in RANKS.items():
                total_rank = sum(ranks)
                stacks = (m + n) * total_rank * BYTES_PER_FLOAT / MIB
                dense = m * n * BYTES_PER_FLOAT / MIB
                rows.append(
                    [
                        model.title,
                        f"{proj} {m}×{n}",
                        str(model.layers),
                        label,
                        str(total_rank),
                        f"{stacks:.2f}",
                        f"{dense:.1f}",
                        f"{dense / stacks:.1f}×",
                    ]
                )
    return rows


def findings(results: Sequence[dict]) -> list[str]:
    """The claims the benchmark exists to check, stated with the figures, for each model and rank setting."""
    lines = []
    for key in dict.fromkeys(r["model"] for r in results):
        for ranks in dict.fromkeys(r["ranks"] for r in results if r["model"] == key):
            case = {
                MethodSpec(r["method"], r["threshold"]).label: r
                for r in results
                if r["model"] == key and r["ranks"] == ranks
            }
            florist = [r for r in case.values() if r["method"] == "florist"]
            dense = case.get(next((k for k in case if k.startswith("dense")), ""), None)
            if not florist or dense is None or dense["svd_seconds"] is None:
                continue
            lines.append(_time_finding(key, ranks, florist, dense))
            lines.append(_memory_finding(key, ranks, florist, dense))
    return lines


def _time_finding(key: str, ranks: str, florist: Sequence[dict], dense: dict) -> str:
    """Target: FLoRIST's whole step (every module, slowest tau) beats one dense SVD of the largest module."""
    model = MODELS[key]
    wall = max(r["seconds"] for r in florist)
    cpu = max(r["cpu_seconds"] for r in florist)
    svd, svd_cpu = dense["svd_seconds"], dense["svd_cpu_seconds"]
    m, n = max(model.shapes.values(), key=lambda s: s[0] * s[1])
    verdict = "holds" if wall < svd and cpu < svd_cpu else "does NOT hold"
    return (
        f"{model.title}, ranks {ranks}: FLoRIST's whole step over {florist[0]['modules']} modules takes "
        f"{wall:.2f} s ({cpu:.2f} s CPU) at its slowest τ; one dense SVD of a single {m}×{n} module takes "
        f"{svd:.2f} s ({svd_cpu:.2f} s CPU): {svd / wall:.1f}× ({svd_cpu / cpu:.1f}× CPU) the whole FLoRIST step; "
        f"target {verdict}. The whole dense route: ~{dense['seconds']:.0f} s."
    )


def _memory_finding(key: str, ranks: str, florist: Sequence[dict], dense: dict) -> str:
    model = MODELS[key]
    total_rank = sum(RANKS[ranks])
    stacks = sum((m + n) * total_rank for _, (m, n) in model.modules()) * BYTES_PER_FLOAT / MIB
    peak = max((r["peak_mib"] or 0) for r in florist)
    biggest = max(m * n for m, n in model.shapes.values()) * BYTES_PER_FLOAT / MIB
    return (
        f"{model.title}, ranks {ranks}: FLoRIST's peak extra memory {peak:.0f} MiB for all modules = "
        f"{peak / stacks:.1f}× the sum of their stacks Σ(m+n)·Σr ({stacks:.0f} MiB), output included; "
        f"the dense route peaks at {dense['peak_mib'] or 0:.0f} MiB for one module at a time "
        f"({(dense['peak_mib'] or 0) / biggest:.1f}× its m×n matrix of {biggest:.0f} MiB)."
    )


def print_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def print_rich(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    Console(width=max(console.width, 150)).print(table)


def report(
    results: Sequence[dict], cli: Sequence[dict], models: Sequence[str], machine: str, args: argparse.Namespace
) -> None:
    memory = MEMORY_METHODS[results[0]["memory_method"]] if results else ""
    notes = [
        machine,
        f"Server step = florist.methods.aggregate (validation included), all q_proj and v_proj modules, "
        f"8 clients, random float32 factors (seed {args.seed}), alpha = 2r; best of {args.repeats} runs "
        f"({args.dense_repeats} for the dense route). Step s is wall time; step CPU s is the CPU time the step "
        f"consumed over all threads, which other processes' load does not inflate "
        f"(1-minute load average before / after: {args.load_before} / {_load()}).",
        f"Peak extra memory: {memory}; each case in a fresh process, kernels warmed up first; "
        "includes the output adapter.",
        "dense: form ΔW = Σ w_k s_k B_k A_k per module, full SVD, keep top-p by energy "
        "(naive FLoRIST; FlexLoRA's cost). "
        f"~: dense cases time {args.dense_modules or 'all'} module(s) of each shape and extrapolate to the model; "
        "their memory is that of one module at a time.",
    ]
    if args.markdown:
        for line in notes:
            print(line + "  ")
        print()
        print_markdown(RESULT_HEADER, result_rows(results))
        print(
            "Theoretical working set per module (float32): FLoRIST decomposes the stacks, "
            "the dense route the m×n update.\n"
        )
        print_markdown(SIZE_HEADER, size_rows(models))
        if cli:
            print_markdown(CLI_HEADER, cli_rows(cli, results))
        for line in findings(results) + cli_findings(cli, results):
            print(f"- {line}")
    else:
        for line in notes:
            print(line)
        print_rich("Server step", RESULT_HEADER, result_rows(results))
        print_rich("Theoretical working set per module (float32)", SIZE_HEADER, size_rows(models))
        if cli:
            print_rich("florist aggregate from a fresh process", CLI_HEADER, cli_rows(cli, results))
        for line in findings(results) + cli_findings(cli, results):
            print(f"• {line}")


def summary(
    results: Sequence[dict], cli: Sequence[dict], models: Sequence[str], machine: str, args: argparse.Namespace
) -> dict:
    """What the report prints, as data: the tables as printed, the findings, and every case's raw figures."""
    options = {k: v for k, v in vars(args).items() if k not in ("case", "json_path", "load_before")}
    return {
        "machine": machine,
        "load_before": args.load_before,
        "load_after": _load(),
        "args": options,
        "table": {"header": RESULT_HEADER, "rows": result_rows(results)},
        "sizes": {"header": SIZE_HEADER, "rows": size_rows(models)},
        "cli": {"header": CLI_HEADER, "rows": cli_rows(cli, results)},
        "findings": findings(results) + cli_findings(cli, results),
        "results": list(results),
        "cli_results": list(cli),
    }


def write_json(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``, its folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)} (default: all)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per case; the fastest is reported (default 3)"
    )
    parser.add_argument("--dense-repeats", type=int, default=1, help="timed runs of the dense route cases (default 1)")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: %(default)s)"
    )
    parser.add_argument(
        "--dense-modules",
        type=int,
        default=1,
        help="modules of each shape the dense route actually runs, then extrapolated; 0 = all (default 1)",
    )
    parser.add_argument(
        "--taus", default="0.9,1.0", help="FLoRIST thresholds (default 0.9,1.0); the dense route uses the lowest"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cli-repeats",
        type=int,
        default=3,
        help="fresh `florist aggregate` processes per CLI case, the fastest reported; 0 skips them (default 3)",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print markdown tables (docs/benchmarks.md is rendered from the JSON)"
    )
    parser.add_argument(
        "--json",
        dest="json_path",
        metavar="PATH",
        type=Path,
        default=RESULTS / "aggregation.json",
        help="where the results go as JSON, for bench/render.py (default bench/results/aggregation.json)",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process, print JSON
    args = parser.parse_args(argv)
    if args.case is not None:
        return args
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(
            f"--models: unknown model {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(MODELS)}"
        )
    try:
        args.taus = sorted({float(t) for t in args.taus.split(",")}, reverse=True)
    except ValueError:
        parser.error(f"--taus: {args.taus!r} is not a comma-separated list of numbers")
    if any(not 0 < t <= 1 for t in args.taus):
        parser.error(f"--taus: every threshold must be in (0, 1], got {args.taus}")
    for name in ("repeats", "dense_repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.cli_repeats < 0:
        parser.error(f"--cli-repeats: must be 0 (none) or more, got {args.cli_repeats}")
    if args.dense_modules < 0:
        parser.error(f"--dense-modules: must be 0 (all) or more, got {args.dense_modules}")
    return args


def all_cases(args: argparse.Namespace) -> list[Case]:
    return [
        Case(
            model,
            ranks,
            spec.key,
            spec.threshold,
            args.seed,
            args.threads,
            args.dense_repeats if spec.dense else args.repeats,
            args.dense_modules,
        )
        for model in args.models
        for ranks in RANKS
        for spec in method_specs(args.taus)
    ]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case is not None:
        print(json.dumps(run_case(Case(**json.loads(args.case)))))
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cases = all_cases(args)
    args.load_before = _load()
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("cases", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{MODELS[case.model].title} / r {case.ranks} / {case.spec.label}")
            results.append(spawn(case))
            progress.advance(task)
        if args.cli_repeats:
            progress.update(task, description="florist aggregate from fresh processes")
            cli = cli_cases(args)
        else:
            cli = []
    machine = machine_line(args.threads)
    report(results, cli, args.models, machine, args)
    write_json(args.json_path, summary(results, cli, args.models, machine, args))


if __name__ == "__main__":
    main()
