#!/usr/bin/env python
"""One client job on a quiet machine and beside a CPU-bound neighbour: how much slower sharing the cores makes it.

The job is a client's local training as florist runs it (``florist.client.LocalTrainer``): the embedded model, 8
Dolly examples cut at 64 tokens, 2 steps of 4, float32. Each variant runs in a fresh process (OpenMP reads its
settings when torch loads it), first alone, then beside a neighbour: another process multiplying matrices with
torch's own thread count under OpenMP's default waiting, as a second training run on the machine would. Each
process runs the job once to warm up and then ``--repeats`` times; the figures are the median job.

- ``florist``: florist's settings (``florist.threads``): idle OpenMP threads wait passively, a thread per CPU allotted;
- ``spinning``: GNU OpenMP's default waiting, idle threads spin before they sleep (``GOMP_SPINCOUNT=300000``);
- ``one thread``: florist's settings with ``FLORIST_THREADS=1``.

    python bench/contention.py                  # about 3 minutes on 2 cores; bench/results/contention.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import load_average, machine_line

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data" / "dolly" / "client_0.json"
VARIANTS = {
    "florist": {},
    "spinning": {"GOMP_SPINCOUNT": "300000"},
    "one thread": {"FLORIST_THREADS": "1"},
}

JOB = r"""
import json, sys, time
import florist
from florist.client import LocalTrainer
from florist.config import LoraConfig, TrainConfig
from florist.data.instructions import load_file, tokenize_dataset
from florist.jobs import ClientStart
from florist.models import load_model
import torch
repeats, data = int(sys.argv[1]), sys.argv[2]
model, tokenizer = load_model(None, dtype="float32")
rows = load_file(data).select(range(8))
examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tokenize_dataset(rows, tokenizer, 64)]
train = TrainConfig(lr=1e-3, max_steps=2, batch_size=4, micro_batch_size=4)
trainer = LocalTrainer(model, tokenizer.pad_token_id, LoraConfig(ranks=[16]), train, dtype="float32")
seconds = []
for k in range(repeats + 1):
    began = time.perf_counter()
    trainer.train(examples, ClientStart(rank=16, alpha=32, seed=k))
    seconds.append(time.perf_counter() - began)
print(json.dumps({"seconds": seconds[1:], "threads": torch.get_num_threads()}))
"""

NEIGHBOUR = "import torch\na = torch.randn(1536, 1536)\nwhile True:\n    a @ a\n"

CLEAN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "FLORIST_THREADS")


def job(settings: dict[str, str], repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN} | {"HF_HUB_OFFLINE": "1"} | settings
    command = [sys.executable, "-c", JOB, str(repeats), str(DATA)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the client job failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def beside_a_neighbour(settings: dict[str, str], repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=env)
    try:
        time.sleep(2.0)  # its threads are up and busy
        return job(settings, repeats)
    finally:
        neighbour.kill()
        neighbour.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed jobs a process (after one to warm up)")
    parser.add_argument("--json", type=Path, default=RESULTS / "contention.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    out = {"machine": machine_line(os.cpu_count() or 1), "load_before": load_average(), "variants": []}
    for name, settings in VARIANTS.items():
        quiet = job(settings, args.repeats)
        busy = beside_a_neighbour(settings, args.repeats)
        row = {
            "variant": name,
            "settings": settings,
            "threads": quiet["threads"],
            "quiet_seconds": quiet["seconds"],
            "busy_seconds": busy["seconds"],
            "quiet": statistics.median(quiet["seconds"]),
            "busy": statistics.median(busy["seconds"]),
        }
        row["ratio"] = row["busy"] / row["quiet"]
        out["variants"].append(row)
        print(f"{name}: {row['quiet']:.2f} s alone, {row['busy']:.2f} s beside a neighbour ({row['ratio']:.1f}x)")
    out["load_after"] = load_average()
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
