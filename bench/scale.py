#!/usr/bin/env python
"""Many clients and rounds: seconds a round, MB down and up a round, peak memory, by clients × engine × round.

Each case is one `florist run` on the tiny test model (2 layers, hidden 64, saved to a temporary folder so that every
process loads it from disk) over the rows of one Dolly client file split IID over the clients, FedIT and FLoRIST at
τ = 0.9, the merge scheme, a tenth of the clients a round, no scoring. Each runs in a process of its own, so the
peak resident memory is that case's: the server's process (with the in-process engine also the clients'; under
Flower's simulation the ClientApps run in worker processes, whose memory is measured apart, at the peak, from
/proc). The setup (the model and data loaded; under Flower, every SuperNode asked which client it is and how much
data it holds) is timed apart; per round: the wall seconds from one "round N finished" log line to the next, the
server process's resident memory then, and the MB down and up (under Flower: the arrays each node was sent, from
flower_traffic.jsonl, so what a node holds already is not counted; in-process: the accounting of metrics.jsonl,
which counts each round's result to its participants and the rounds a client sat out when it is next drawn).
bench/render.py renders bench/results/scale.json into docs/benchmarks.md; the JSON is written after every case.

    python bench/scale.py                        # every case (about 12 minutes on 2 cores)
    python bench/scale.py --clients 1000 --engines flower --rounds 3
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
DATA = ROOT.parent / "shared" / "data" / "dolly" / "client_2.json"  # 3,775 rows: two for each of 1,000 clients
CASES = [  # (clients, engine, rounds)
    (10, "inprocess", 20),
    (100, "inprocess", 40),
    (1000, "inprocess", 3),
    (10, "flower", 10),
    (100, "flower", 40),
    (1000, "flower", 3),
]

# The case itself, in a fresh process: run florist, time each round from its log line, print one JSON line.
CASE = r"""
import json, os, resource, sys, time
from florist import run as run_module
from florist.config import load_config
marks, ready = [], []
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
def log(line):
    if line.startswith("client sizes:"):  # the data is loaded (in-process) or every SuperNode has answered (Flower)
        ready.append(time.perf_counter())
    if line.startswith("round ") and line.endswith("finished and saved"):
        marks.append((int(line.split()[1]), time.perf_counter(), rss_mib()))
began = time.perf_counter()
config = load_config(None, json.loads(sys.argv[1]))
run_module.run(config, progress=False, log=log)
starts = [ready[0]] + [t for _, t, _ in marks[:-1]]
seconds = {r: t - s for (r, t, _), s in zip(marks, starts)}
rss = {r: m for r, _, m in marks}
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"setup_seconds": ready[0] - began, "round_seconds": seconds, "round_rss_mib": rss,
                  "peak_rss_mib": peak_kib / 1024, "wall": time.perf_counter() - began}))
"""


def save_tiny_model(folder: Path) -> Path:
    from florist.models import tiny_llama

    model, tokenizer = tiny_llama(0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def overrides(model: Path, output: Path, clients: int, engine: str, rounds: int) -> list[str]:
    return [
        f'model.name="{model}"',
        f'data.train="{DATA}"',
        f"data.clients={clients}",
        'data.partition="iid"',
        "data.max_examples_per_client=2",
        "data.cutoff=32",
        "lora.ranks=[4]",
        "train.batch_size=2",
        "train.micro_batch_size=2",
        "train.lr=0.01",
        f"federation.rounds={rounds}",
        f"federation.clients_per_round={max(1, clients // 10)}",
        'federation.methods=["fedit","florist"]',
        'federation.thresholds="0.9"',
        'eval.questions="none"',
        "eval.heldout_loss=false",
        f'engine="{engine}"',
        f'output="{output}"',
    ]


class WorkerPeak:
    """The largest summed resident memory of this process's other descendants (Flower's simulation workers), polled."""

    def __init__(self, root: int):
        self.root, self.peak_mib = root, 0.0

    def poll(self) -> None:
        total = 0
        for pid in descendants(self.root)[1:]:  # the case's own process is measured by itself
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
            except (OSError, StopIteration):
                continue
        self.peak_mib = max(self.peak_mib, total / 1024)


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def run_case(model: Path, work: Path, clients: int, engine: str, rounds: int) -> dict:
    output = work / f"{engine}-{clients}"
    args = json.dumps(overrides(model, output, clients, engine, rounds))
    env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0"}
    log = open(work / f"{engine}-{clients}.log", "w")
    command = [sys.executable, "-c", CASE, args]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log)
    workers = WorkerPeak(process.pid)
    while process.poll() is None:
        workers.poll()
        time.sleep(0.5)
    log.close()
    if process.returncode:  # the log goes with the temporary folder: its end is shown here
        tail = Path(log.name).read_text(errors="replace").splitlines()[-25:]
        raise SystemExit("\n".join([*tail, f"{engine} with {clients} clients failed (the log's end is above)"]))
    measured = json.loads(process.stdout.read().decode().strip().splitlines()[-1])
    return {
        "clients": clients,
        "engine": engine,
        "per_round": max(1, clients // 10),
        "setup_seconds": round(measured["setup_seconds"], 1),
        "rounds": [
            {
                "round": r,
                "seconds": round(measured["round_seconds"][str(r)], 2),
                "rss_mib": round(measured["round_rss_mib"][str(r)], 1),
                **traffic(output, r, engine),
            }
            for r in range(1, rounds + 1)
        ],
        "peak_rss_mib": round(measured["peak_rss_mib"], 1),
        "worker_peak_rss_mib": round(workers.peak_mib, 1) if engine == "flower" else None,
        "wall_seconds": round(measured["wall"], 1),
    }


def traffic(output: Path, round_number: int, engine: str) -> dict:
    """MB down and up in a round: what the messages carried under Flower, the accounting in-process."""
    if engine == "flower":
        lines = [json.loads(x) for x in (output / "flower_traffic.jsonl").read_text().splitlines()]
        clients = [c for x in lines if x["round"] == round_number for c in x["clients"]]
        down = sum(c["down"]["total"] for c in clients if c["down"])
        up = sum(c["up"]["total"] for c in clients if c["up"])
    else:
        records = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
        mine = [r["communication"] for r in records if r["round"] == round_number]
        down = sum(sum(c["download_params"]) * c["bytes_per_param"] for c in mine)
        up = sum(sum(c["upload_params"]) * c["bytes_per_param"] for c in mine)
    return {"mb_down": round(down / 1e6, 4), "mb_up": round(up / 1e6, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=RESULTS / "scale.json", help="where the JSON goes")
    parser.add_argument("--clients", type=int, nargs="*", help="only these client counts")
    parser.add_argument("--engines", nargs="*", choices=["inprocess", "flower"], help="only these engines")
    parser.add_argument("--rounds", type=int, help="rounds of every case (default: each case's own)")
    args = parser.parse_args(argv)
    cases = [
        (c, e, args.rounds or r)
        for c, e, r in CASES
        if (not args.clients or c in args.clients) and (not args.engines or e in args.engines)
    ]
    out = {"machine": machine_line(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))}
    out |= {"load_before": load_average(), "load_after": None, "cases": []}
    with tempfile.TemporaryDirectory(prefix="florist-scale-") as tmp:
        model = save_tiny_model(Path(tmp) / "tiny-model")
        for clients, engine, rounds in cases:
            print(f"{engine}, {clients} clients, {rounds} rounds (load {load_average()})", file=sys.stderr)
            out["cases"].append(run_case(model, Path(tmp), clients, engine, rounds))
            print(f"  {json.dumps(out['cases'][-1])}", file=sys.stderr)
            out["load_after"] = load_average()
            args.json.write_text(json.dumps(out, indent=1) + "\n")  # after every case: a later one may not finish
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
