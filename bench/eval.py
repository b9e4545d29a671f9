#!/usr/bin/env python
"""Evaluation benchmark: MMLU questions per second, batched log-likelihood scoring against the paper's generation.

Both protocols score the embedded model (``florist.models.load_model()``) on the same questions of the 1,444-question
MMLU subset through ``florist.evaluation.evaluate``, under the compute dtype florist evaluates with (bfloat16 autocast
by default, float32 weights), at the same batch size:

- ``letter``: ``protocol="loglik"``, ``mode="letter"``: one forward pass per prompt, the log-probabilities of " A" ...
  " D" at its last position (florist's default for MMLU files);
- ``option``: ``mode="option"`` (``--protocols letter,option,generate``): the mean log-probability of each
  option's text;
- ``generate``: ``protocol="generate"``: the paper's sampled 32 new tokens (temperature 0.2, top-p 0.6, top-k 30),
  batched (left-padded) like the scorers;
- ``generate-unbatched``: the same, one question at a time (batch size 1): a plain loop over the questions.

Generation is slow, so ``--generate-limit`` can time it on fewer questions (the first of the same shuffled list);
questions per second is a rate, so the two still compare (their prompt lengths are reported beside it).

    python bench/eval.py                              # all 1,444 questions scored, 128 generated each way
    python bench/eval.py --threads 1 --limit 200 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from machine import Stopwatch, announce_machine, load_average  # noqa: E402

from florist.evaluation import evaluate, load_questions, mmlu_prompt  # noqa: E402
from florist.models import load_model  # noqa: E402

DEFAULT_QUESTIONS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mmlu" / "mmlu_1444.json"
RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOLS = ("letter", "option", "generate", "generate-unbatched")
GENERATIVE = ("generate", "generate-unbatched")


def pick(questions: list, limit: int, seed: int) -> list:
    """A seeded shuffle (the file is sorted by subject), then the first ``limit`` (0: all)."""
    order = list(questions)
    random.Random(seed).shuffle(order)
    return order[:limit] if limit else order


def run_protocol(model, tokenizer, questions, protocol: str, args) -> dict:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    kwargs = {"protocol": "generate"} if protocol in GENERATIVE else {"protocol": "loglik", "mode": protocol}
    batch_size = 1 if protocol == "generate-unbatched" else args.batch_size
    clock = Stopwatch()
    with autocast:
        result = evaluate(model, tokenizer, questions, batch_size=batch_size, seed=args.seed, **kwargs)
    t = clock.elapsed()
    lengths = [len(tokenizer(mmlu_prompt(q))["input_ids"]) for q in questions]
    return {
        "protocol": protocol,
        "questions": len(questions),
        "wall": t.wall,
        "cpu": t.cpu,
        "q_per_s_wall": len(questions) / t.wall,
        "q_per_s_cpu": len(questions) / t.cpu * args.threads,
        "accuracy": result.accuracy,
        "micro_accuracy": result.micro_accuracy,
        "mean_prompt_tokens": statistics.mean(lengths),
        "load_after": load_average(),
    }


def report(results: dict[str, dict], args, machine: str) -> None:
    generative = [g for g in GENERATIVE if g in results]
    header = [
        "protocol",
        "questions",
        "mean prompt tokens",
        "wall s",
        "CPU s",
        "q/s (wall)",
        "q/s (CPU)",
        *(f"× {g} (wall / CPU)" for g in generative),
        "accuracy (macro)",
        "load after",
    ]
    rows = []
    for r in results.values():
        ratios = []
        for g in generative:
            gen = results[g]
            ratios.append(
                ""
                if r is gen
                else f"{r['q_per_s_wall'] / gen['q_per_s_wall']:.1f} / {r['q_per_s_cpu'] / gen['q_per_s_cpu']:.1f}"
            )
        rows.append(
            [
                r["protocol"],
                str(r["questions"]),
                f"{r['mean_prompt_tokens']:.0f}",
                f"{r['wall']:.1f}",
                f"{r['cpu']:.1f}",
                f"{r['q_per_s_wall']:.2f}",
                f"{r['q_per_s_cpu']:.2f}",
                *ratios,
                f"{100 * r['accuracy']:.2f}%",
                r["load_after"],
            ]
        )
    notes = [
        f"Machine: {machine}.",
        f"Embedded SmolLM2-135M-Instruct, float32 weights, {args.dtype} compute, batch size {args.batch_size}; "
        f"questions: a seeded shuffle (seed {args.seed}) of {args.questions.name}. "
        "q/s (CPU) = questions per CPU-second "
        "times the threads, which other processes' load hardly changes; wall figures move with the load.",
    ]
    if args.markdown:
        for line in notes:
            print(line + "  ")
        print()
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        from rich.console import Console
        from rich.table import Table

        for line in notes:
            print(line)
        table = Table(title="MMLU evaluation speed")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=200).print(table)
    letter = results.get("letter")
    for g in generative if letter is not None else ():
        gen = results[g]
        wall, cpu = letter["q_per_s_wall"] / gen["q_per_s_wall"], letter["q_per_s_cpu"] / gen["q_per_s_cpu"]
        verdict = "met" if min(wall, cpu) >= 10 else "NOT met"
        print(
            f"\nTarget ≥ 10× the generative protocol ({g}): "
            f"letter scoring is {wall:.1f}× (wall), {cpu:.1f}× (CPU): {verdict}."
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS, help="MMLU file (default: the 1,444 subset)")
    p.add_argument("--limit", type=int, default=0, help="questions to score (default 0: all)")
    p.add_argument(
        "--generate-limit",
        type=int,
        default=128,
        help="questions to generate for, the first of the same list (default 128; 0: as --limit)",
    )
    p.add_argument(
        "--protocols", default="letter,generate,generate-unbatched", help=f"comma-separated from {', '.join(PROTOCOLS)}"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype (autocast)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--markdown", action="store_true", help="print a markdown table (docs/benchmarks.md is rendered from the JSON)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where eval.json goes (default bench/results)")
    args = p.parse_args(argv)
    args.protocols = [x.strip() for x in args.protocols.split(",") if x.strip()]
    if not args.protocols or set(args.protocols) - set(PROTOCOLS):
        p.error(f"--protocols: choose from {', '.join(PROTOCOLS)}")
    for name in ("limit", "generate_limit"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}: must be 0 or more")
    if args.batch_size < 1 or args.threads < 1:
        p.error("--batch-size and --threads must be at least 1")
    if not args.questions.is_file():
        p.error(f"--questions: {args.questions}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    machine = announce_machine(args.threads)
    model, tokenizer = load_model()
    questions = pick(load_questions(args.questions), args.limit, args.seed)
    results = {}
    for protocol in args.protocols:
        subset = questions[: args.generate_limit] if protocol in GENERATIVE and args.generate_limit else questions
        print(f"{protocol}: {len(subset)} questions ...", file=sys.stderr, flush=True)
        results[protocol] = run_protocol(model, tokenizer, subset, protocol, args)
    report(results, args, machine)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    (args.out / "eval.json").write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out / 'eval.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
