#!/usr/bin/env python
"""The main job's cost and what it shows: `make run` timed on this machine, its results table kept as JSON.

Runs `make run RUN=<a fresh directory>` (the installed `.venv` is used as it is), times it, and writes
bench/results/main_job.json with the machine, the load before and after, the wall time, the training and
evaluation seconds the run recorded, the base model's scores and every row of the run's results table.
bench/render.py renders the README's table and docs/commands.md's figures from it.

    python bench/main_job.py            # about 5 minutes on 2 cores
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


def run_make(run_dir: Path) -> float:
    """``make run`` into ``run_dir``; its wall seconds. Its output goes to ``run_dir``'s log, beside it."""
    began = time.perf_counter()
    with open(run_dir.parent / "make_run.log", "w") as log:
        subprocess.run(["make", "run", f"RUN={run_dir}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - began


def summary(run_dir: Path, wall: float, load_before: str) -> dict:
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
        "wall_seconds": round(wall, 1),
        "training_groups": [{"seconds": s, "tokens": t} for s, t in trained.items()],
        "evaluations": len(evaluations),
        "base": {"accuracy": base.get("accuracy"), "heldout_loss": base.get("heldout_loss")},
        "rows": json.loads((run_dir / "results.json").read_text()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=RESULTS / "main_job.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="florist-main-job-") as tmp:
        run_dir, load_before = Path(tmp) / "run", load_average()
        print(f"make run RUN={run_dir} (load {load_before})", file=sys.stderr)
        out = summary(run_dir, run_make(run_dir), load_before)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{out['wall_seconds']:.0f} s; wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
