#!/usr/bin/env python
"""Two-way compression on the main job: every method at every upload threshold, from one training.

Runs `florist run` with make run's settings (the embedded model, the built-in data, 8 clients, one round) and
`federation.upload_thresholds` swept, so that every method, FLoRIST τ and τ up is aggregated from the same trained
clients; then writes bench/results/upload_cuts.json: per branch its upload threshold, the mean rank its clients
kept, its upload and download, its quality, and, per method and τ, the least upload whose held-out loss is within
``--tolerance`` of the same branch's at τ up = 1 (the saving at equal quality). bench/render.py renders its table
into docs/methods.md.

    python bench/upload_cuts.py                     # about 8 minutes on 2 cores
    python bench/upload_cuts.py --run DIR           # summarise a run already made with these settings
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
METHODS = "florist,flora,fedit,flexlora"
UPLOAD_THRESHOLDS = "0.80,0.90,0.95,0.98,1"


def run_job(run_dir: Path, log: Path) -> float:
    """The main job with the upload thresholds swept, into ``run_dir``; its wall seconds."""
    florist = Path(sys.executable).parent / "florist"
    command = [str(florist), "run", "--output", str(run_dir), "--methods", METHODS, "--quiet"]
    command += ["--set", f'federation.upload_thresholds="{UPLOAD_THRESHOLDS}"']
    began = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - began


def summary(run_dir: Path, tolerance: float) -> dict:
    table = json.loads((run_dir / "results.json").read_text())
    rows = [r for r in table if r["label"].split("+")[0].split("@")[0] == r["method"]]  # branches, not picks
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    kept = {}
    for r in records:
        ranks = [p for client in r.get("upload_ranks", []) for p in client.values()]
        if r["round"] == 1 and ranks:
            kept[r["branch"]] = sum(ranks) / len(ranks)
    branches = [
        {
            "label": r["label"],
            "method": r["method"],
            "threshold": r["threshold"],
            "upload_threshold": r.get("upload_threshold", 1.0),
            "kept_rank": kept.get(r["label"]),
            "upload_bytes": r["upload_bytes"],
            "download_bytes": r["download_bytes"],
            "heldout_loss": r["heldout_loss"],
            "accuracy": r["accuracy"],
        }
        for r in rows
    ]
    whole = {(b["method"], b["threshold"]): b for b in branches if b["upload_threshold"] == 1.0}
    savings = []
    for key, base in whole.items():
        close = [
            b
            for b in branches
            if (b["method"], b["threshold"]) == key and b["heldout_loss"] <= base["heldout_loss"] + tolerance
        ]
        best = min(close, key=lambda b: b["upload_bytes"])
        savings.append(
            {
                "method": key[0],
                "threshold": key[1],
                "upload_threshold": best["upload_threshold"],
                "loss_whole": base["heldout_loss"],
                "loss_cut": best["heldout_loss"],
                "upload_whole": base["upload_bytes"],
                "upload_cut": best["upload_bytes"],
                "saving": base["upload_bytes"] / best["upload_bytes"],
            }
        )
    picks = [  # FLoRIST-O/E, picked over the whole grid
        {"label": r["label"], "threshold": r["threshold"], "upload_threshold": r.get("upload_threshold", 1.0)}
        for r in table
        if r not in rows
    ]
    return {"tolerance": tolerance, "branches": branches, "savings": savings, "picks": picks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=RESULTS / "upload_cuts.json", help="where the JSON goes")
    parser.add_argument("--run", type=Path, help="summarise this run directory instead of running the job")
    parser.add_argument("--tolerance", type=float, default=0.01, help="held-out loss counted as equal quality")
    args = parser.parse_args(argv)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="florist-upload-cuts-") as tmp:
        run_dir, wall = args.run, None
        if run_dir is None:
            run_dir = Path(tmp) / "run"
            print(f"florist run --output {run_dir} (load {load_before}); log in {tmp}/run.log", file=sys.stderr)
            wall = run_job(run_dir, Path(tmp) / "run.log")
        out = {
            "machine": machine_line(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))),
            "load_before": load_before,
            "load_after": load_average(),
            "wall_seconds": None if wall is None else round(wall, 1),
            "methods": METHODS,
            "upload_thresholds": UPLOAD_THRESHOLDS,
            **summary(run_dir, args.tolerance),
        }
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
