#!/usr/bin/env python
"""Memory benchmark: the peak resident memory of a federated round against that of the loaded base model alone.

florist keeps one base model for every client and every method: PEFT puts a client's LoRA layers into it and
takes them out again, and the methods' global updates are written into it in place. So a round of 8 clients
should peak at about one base model plus the adapters and one client's training activations, where the
reference code's ``copy.deepcopy`` per client adds a whole model per client alive at once.

Three fresh processes, with the same imports:

- ``loaded``: ``florist.models.load_model()`` (the embedded SmolLM2-135M, float32), every weight read once so that
  the memory-mapped checkpoint is resident; resident memory after the load;
- ``round-1`` and ``round-8``: ``florist.run.run`` on that model, one round of every method over the Dolly clients
  (``../shared/data/dolly``) with tiny budgets (``--examples`` per client, ``--steps`` optimizer steps), one client
  sampled or all 8; the process's peak resident memory. The cutoff (128) is below most Dolly examples, so every
  client's micro-batches are the same size and the two rounds differ only in how many clients train.

What 7 more clients add (round-8 minus round-1) is what the design keeps small; what one client adds over the
loaded model is its training activations, which depend on the micro-batch, not on the number of clients.

    python bench/memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dolly"
RESULTS = Path(__file__).resolve().parent / "results"


def measure_loaded() -> dict:
    from machine import peak_rss_mib, rss_mib

    import florist.run  # noqa: F401  - the same imports as the round, so the baselines match
    from florist.models import load_model

    before = rss_mib()
    model, _ = load_model()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    sum(float(p.detach().sum()) for p in model.parameters())  # page the memory-mapped weights in
    return {
        "rss_before_load_mib": before,
        "rss_loaded_mib": rss_mib(),
        "peak_mib": peak_rss_mib(),
        "weights_mib": weights,
    }


def measure_round(args: argparse.Namespace, clients: int) -> dict:
    from machine import Stopwatch, peak_rss_mib, rss_mib

    from florist.config import load_config
    from florist.run import run

    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            overrides=[
                f"output={json.dumps(str(Path(out) / 'run'))}",
                f"data.train={json.dumps(str(args.data))}",
                "data.clients=8",
                f"federation.clients_per_round={clients}",
                f"data.max_examples_per_client={args.examples}",
                f"data.cutoff={args.cutoff}",
                f"train.max_steps={args.steps}",
                f"train.batch_size={args.batch_size}",
                f"train.micro_batch_size={args.micro_batch_size}",
                "federation.rounds=1",
                'eval.questions="none"',
                "eval.heldout_loss=false",
            ]
        )
        clock = Stopwatch()
        run(config, progress=False, log=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
        t = clock.elapsed()
        methods = config.federation.methods
    return {"rss_end_mib": rss_mib(), "peak_mib": peak_rss_mib(), "wall": t.wall, "cpu": t.cpu, "methods": methods}


def child(kind: str, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh interpreter, so its peak resident memory is its own."""
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        kind,
        "--data",
        str(args.data),
        "--examples",
        str(args.examples),
        "--steps",
        str(args.steps),
        "--cutoff",
        str(args.cutoff),
        "--batch-size",
        str(args.batch_size),
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"memory bench: the {kind} process failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a folder of 8 client files (default: Dolly)")
    p.add_argument("--examples", type=int, default=16, help="examples per client (default 16)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per client (default 1)")
    p.add_argument("--cutoff", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where memory.json goes (default bench/results)")
    p.add_argument("--child", choices=("loaded", "round-1", "round-8"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.data.is_dir():
        p.error(f"--data: {args.data}: not a folder of client files")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(
            json.dumps(
                measure_loaded() if args.child == "loaded" else measure_round(args, int(args.child.split("-")[1]))
            )
        )
        return
    from machine import announce_machine, load_average

    machine = announce_machine(args.threads)
    loaded = child("loaded", args)
    print(f"loaded: {loaded['rss_loaded_mib']:.0f} MiB resident", file=sys.stderr)
    one, eight = child("round-1", args), child("round-8", args)
    activations, more = one["peak_mib"] - loaded["rss_loaded_mib"], eight["peak_mib"] - one["peak_mib"]
    lines = [
        f"Machine: {machine}; load average after: {load_average()}.",
        f"Base model loaded and paged in (float32 weights {loaded['weights_mib']:.0f} MiB): "
        f"{loaded['rss_loaded_mib']:.0f} MiB resident "
        f"({loaded['rss_before_load_mib']:.0f} MiB before the load: Python, torch, transformers, florist).",
        f"One round of every method ({', '.join(eight['methods'])}), {args.examples} examples a client, "
        f"{args.steps} step(s) each (batch {args.batch_size}, micro-batch {args.micro_batch_size}, "
        f"cutoff {args.cutoff}):",
        f"  1 client:  peak {one['peak_mib']:.0f} MiB resident "
        f"({activations:+.0f} MiB over the loaded model: one client's training), {one['wall']:.0f} s",
        f"  8 clients: peak {eight['peak_mib']:.0f} MiB resident "
        f"({more:+.0f} MiB over 1 client = {more / 7:+.0f} MiB a further client), {eight['wall']:.0f} s",
        f"A deep copy of the model per client would add {loaded['weights_mib']:.0f} MiB for every copy alive.",
    ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": machine,
        "loaded": loaded,
        "round_1": one,
        "round_8": eight,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "memory.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out / 'memory.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
