#!/usr/bin/env python
"""The main job's cost and what it shows: `make run` timed from a fresh clone, set-up included, its table kept as JSON.

Clones this repository's HEAD into a temporary folder and runs `make install` there (a new `.venv`, as a new
user's first `make run` does), then `make run`, each timed. Package caches (pip's, uv's) stay as the machine has
them: the figure is a first run on a machine that has fetched the packages before, not the download itself.
Writes bench/results/main_job.json with the machine, the load before and after, the set-up and job seconds, the
training and evaluation seconds the run recorded, the base model's scores and every row of the run's results
table. bench/render.py renders the README's table and docs/commands.md's figures from it.

    python bench/main_job.py              # about 5 minutes on 2 cores
    python bench/main_job.py --installed  # the job alone, on this checkout's installed .venv
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import load_average, machine_line

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def run_make(target: str, cwd: Path, log: Path, *args: str) -> float:
    """``make target`` in ``cwd``, its output appended to ``log``; its wall seconds."""
    began = time.perf_counter()
    with open(log, "a") as out:
        subprocess.run(["make", target, *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - began


def fresh_clone(into: Path) -> Path:
    """HEAD of this repository cloned into ``into``; a checkout with uncommitted changes is refused, since the clone
    would not hold them."""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    if dirty.stdout.strip():
        sys.exit("main_job: the checkout has uncommitted changes, which a fresh clone would not hold; commit them")
    subprocess.run(["git", "clone", "-q", str(ROOT), str(into)], check=True)
    return into


def summary(run_dir: Path, setup: float | None, job: float, load_before: str) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    base = next(r for r in records if r["round"] == 0)["evaluation"]
    trained = {}  # one training group's seconds: branches that shared it record the same sum
    for r in records:
        if r["round"] > 0 and r["train"]:
            trained.setdefault(round(r["train"]["seconds"], 6), r["train"]["tokens"])
    evaluations = [r["evaluation"].get("seconds") for r in records if r["evaluation"].get("seconds") is not None]
    return {
        "machine": machine_line(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))),
        "load_before": load_before,
        "load_after": load_average(),
        "setup_seconds": None if setup is None else round(setup, 1),  # None: the installed .venv was used
        "job_seconds": round(job, 1),
        "wall_seconds": round(job + (setup or 0.0), 1),
        "training_groups": [{"seconds": s, "tokens": t} for s, t in trained.items()],
        "evaluations": len(evaluations),
        "base": {"accuracy": base.get("accuracy"), "heldout_loss": base.get("heldout_loss")},
        "rows": json.loads((run_dir / "results.json").read_text()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=RESULTS / "main_job.json", help="where the JSON goes")
    parser.add_argument("--installed", action="store_true", help="time the job alone, on this checkout's .venv")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="florist-main-job-") as tmp:
        log, load_before = Path(tmp) / "make.log", load_average()
        checkout = ROOT if args.installed else fresh_clone(Path(tmp) / "clone")
        run_dir = Path(tmp) / "run"
        print(f"make run RUN={run_dir} in {checkout} (load {load_before}); output in {log}", file=sys.stderr)
        setup = None if args.installed else run_make("install", checkout, log)
        if setup is not None:
            print(f"set-up (make install): {setup:.0f} s", file=sys.stderr)
        out = summary(run_dir, setup, run_make("run", checkout, log, f"RUN={run_dir}"), load_before)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{out['wall_seconds']:.0f} s; wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
