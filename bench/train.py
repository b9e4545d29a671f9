#!/usr/bin/env python
"""Local-training benchmark: one client's LoRA fine-tuning, florist's trainer against the reference code's way.

Both train the embedded model (``florist.models.load_model()``) on the same slice of real Dolly data with the
same hyperparameters (r 16, alpha 32, q_proj/v_proj, dropout 0.05, AdamW lr 3e-4, linear decay, no warm-up) and the
same number of optimizer steps:

- ``reference``: as the FLoRA and FLoRIST code trains a client: a ``copy.deepcopy`` of the base model, PEFT on the
  copy, ``transformers.Trainer`` with ``DataCollatorForSeq2Seq`` (pad to the longest, multiple of 8), randomly
  batched, float32 on the CPU;
- ``florist-fp32``: ``florist.client.LocalTrainer`` in float32 (PEFT on the shared base, length-grouped batches);
- ``florist-bf16``: the same with bfloat16 autocast, the default;
- ``florist-bf16-ckpt`` (``--checkpointing``): with gradient checkpointing too (less memory, one more forward).

Throughput counts real (unpadded) tokens, so padding shows as lost throughput. FLOP/s are estimated from tokens:
``6·N·T`` is the usual full-fine-tuning figure (forward 2NT, activation gradients 2NT, weight gradients 2NT); a
LoRA step on a frozen base skips the base's weight gradients, so it executes about ``4·N·T`` (``6·N·T`` with
checkpointing, which repeats the forward). N counts the base's parameters (the tied embedding once, as the LM
head's matmul); attention scores (under 2% at these lengths) and the LoRA matmuls (~0.1%) are left out. The
executed rate is compared with the matrix-multiply rate measured on the same machine, at the same thread count.

florist-fp32 and florist-bf16 see the same batches, LoRA initialisation and dropout masks (same seed), so their
loss sequences must agree to bfloat16's precision; the benchmark prints both and their largest relative gap.

    python bench/train.py --threads 1                     # about 10 minutes on a quiet 2-core machine
    python bench/train.py --threads 1 --steps 4 --markdown
    python bench/train.py --variants florist-bf16 --profile    # where a step's CPU time goes, op by op

Under ``--profile`` the florist variants run inside ``torch.profiler``, which slows them about twofold: the table
it prints gives shares of CPU time, and that run's throughput figures are not comparable with the others.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from machine import (  # noqa: E402
    MatmulPeak,
    Stopwatch,
    announce_machine,
    load_average,
    matmul_peak,
    peak_rss_mib,
    release_free_memory,
    reset_peak_rss,
    rss_mib,
)

import florist.client as client_module  # noqa: E402
from florist.client import LocalTrainer  # noqa: E402
from florist.config import LoraConfig, TrainConfig  # noqa: E402
from florist.data.instructions import load_file, tokenize_dataset  # noqa: E402
from florist.jobs import ClientStart  # noqa: E402
from florist.models import load_model  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dolly" / "client_0.json"
RESULTS = Path(__file__).resolve().parent / "results"

# The matrix-multiply rates training is compared with: large square products (the attainable peak) and the
# model's own MLP product for a micro-batch of about 1,024 tokens (what a 576-wide model can expect).
PEAK_CASES = {
    "float32": (torch.float32, (2048, 2048, 2048)),
    "bfloat16": (torch.bfloat16, (2048, 2048, 2048)),
    "float32-model": (torch.float32, (1024, 576, 1536)),
    "bfloat16-model": (torch.bfloat16, (1024, 576, 1536)),
}


@dataclass
class Run:
    name: str
    wall: float
    cpu: float
    setup_wall: float  # reference only: deepcopy, PEFT injection, Trainer construction
    setup_cpu: float
    steps: int
    real_tokens: int
    computed_tokens: int  # real plus padding
    peak_extra_mib: float  # peak resident memory during the run minus resident memory before it
    executed_flop_per_token: float  # as a multiple of N: 4 (frozen-base LoRA) or 6 (with checkpointing)
    losses: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- data


def client_examples(path: Path, count: int, cutoff: int, tokenizer) -> list[dict]:
    """The first ``count`` rows of a client file, Alpaca-prompted and tokenized as florist trains them."""
    rows = load_file(path)
    if len(rows) < count:
        raise SystemExit(f"train bench: {path} has {len(rows)} rows, fewer than --examples {count}")
    tokenized = tokenize_dataset(rows.select(range(count)), tokenizer, cutoff)
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tokenized]


class TokenCounter:
    """Wraps a collator and counts the real and padded tokens of every micro-batch it builds."""

    def __init__(self, collate):
        self.collate, self.real, self.computed = collate, 0, 0

    def __call__(self, *args, **kwargs):
        batch = self.collate(*args, **kwargs)
        self.real += int(batch["attention_mask"].sum())
        self.computed += batch["attention_mask"].numel()
        return batch


# ---------------------------------------------------------------- the two trainers


def reset_peak() -> float:
    """Release freed memory, reset the kernel's peak-RSS mark (Linux) and return the resident MiB now."""
    release_free_memory()
    reset_peak_rss()
    return rss_mib()


def train_florist(model, tokenizer, examples, args, dtype: str, checkpointing: bool) -> Run:
    name = f"florist-{'bf16' if dtype == 'bfloat16' else 'fp32'}{'-ckpt' if checkpointing else ''}"
    trainer = LocalTrainer(
        model,
        tokenizer.pad_token_id,
        LoraConfig(ranks=[args.rank], target_modules=["q_proj", "v_proj"], dropout=0.05),
        TrainConfig(
            lr=args.lr, max_steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size
        ),
        dtype=dtype,
        gradient_checkpointing=checkpointing,
    )
    counter = TokenCounter(client_module.collate)
    client_module.collate = counter  # LocalTrainer builds its micro-batches with this module-level function
    before = reset_peak()
    clock = Stopwatch()
    try:
        with profiled(name, args.profile):
            _, log, _ = trainer.train(
                examples,
                ClientStart(rank=args.rank, alpha=2 * args.rank, seed=args.seed),
                on_step=lambda s, n, loss: progress(name, s, n, loss),
            )
    finally:
        client_module.collate = counter.collate
    t = clock.elapsed()
    return Run(
        name,
        t.wall,
        t.cpu,
        0.0,
        0.0,
        log.steps,
        counter.real,
        counter.computed,
        peak_rss_mib() - before,
        6.0 if checkpointing else 4.0,
        list(log.losses),
    )


def train_reference(model, tokenizer, examples, args) -> Run:
    """A client as the FLoRA/FLoRIST code trains one: deep copy, PEFT, HF Trainer, Seq2Seq padding, float32."""
    import datasets
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    class Progress(TrainerCallback):
        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                progress("reference", state.global_step, state.max_steps, logs["loss"])

    before = reset_peak()
    clock = Stopwatch()
    client_model = copy.deepcopy(model)
    torch.manual_seed(args.seed)
    client_model = peft.get_peft_model(
        client_model,
        peft.LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.05,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    rows = datasets.Dataset.from_list([{**e, "attention_mask": [1] * len(e["input_ids"])} for e in examples])
    counter = TokenCounter(DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=client_model,
            args=TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=args.micro_batch_size,
                gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
                max_steps=args.steps,
                learning_rate=args.lr,
                lr_scheduler_type="linear",
                warmup_steps=0,
                weight_decay=0.0,
                optim="adamw_torch",
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                seed=args.seed,
                train_sampling_strategy="random",
                dataloader_pin_memory=False,
                disable_tqdm=True,
            ),
            train_dataset=rows,
            data_collator=counter,
            callbacks=[Progress()],
        )
        setup = clock.elapsed()
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        steps = trainer.state.global_step
    t = clock.elapsed()
    del trainer, client_model
    return Run(
        "reference",
        t.wall,
        t.cpu,
        setup.wall,
        setup.cpu,
        steps,
        counter.real,
        counter.computed,
        peak_rss_mib() - before,
        4.0,
        losses,
    )


@contextmanager
def profiled(name: str, enabled: bool, rows: int = 15):
    """Run the block under torch.profiler and print its costliest operators by self CPU time, when enabled."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n{name}: share of self CPU time by operator (profiled run, {total / 1e6:.1f} CPU s)")
    for e in events[:rows]:
        print(f"  {e.self_cpu_time_total / total:6.1%}  {e.key}  ({e.count} calls)")


def progress(name: str, step: int, total: int, loss: float) -> None:
    print(f"  {name}: step {step}/{total} loss {loss:.4f}  (load {load_average()})", file=sys.stderr, flush=True)


def warm_up(model, tokenizer, examples) -> None:
    """One forward and backward in each precision, so no variant pays for first-call setup."""
    ids = torch.tensor([examples[0]["input_ids"]])
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- figures


def measure_peaks(threads: int) -> dict[str, MatmulPeak]:
    return {key: matmul_peak(dtype, threads, shape) for key, (dtype, shape) in PEAK_CASES.items()}


def best_peaks(*measurements: dict[str, MatmulPeak]) -> dict[str, MatmulPeak]:
    """Per case, the best rate of several measurements (before and after the runs): the attainable one."""
    return {
        key: MatmulPeak(
            first.dtype,
            first.shape,
            max(m[key].gflops_wall for m in measurements),
            max(m[key].gflops_cpu for m in measurements),
        )
        for key, first in measurements[0].items()
    }


def tokens_per_second(run: Run) -> tuple[float, float]:
    return run.real_tokens / run.wall, run.real_tokens / run.cpu


def flops(run: Run, n_params: int, threads: int) -> dict:
    """FLOP/s of a run (GFLOP/s): model (6NT over real tokens) and executed (computed tokens, padding included)."""
    train_wall, train_cpu = run.wall - run.setup_wall, run.cpu - run.setup_cpu
    return {
        "model_6nt_wall": 6 * n_params * run.real_tokens / run.wall / 1e9,
        "model_6nt_cpu": 6 * n_params * run.real_tokens / run.cpu * threads / 1e9,
        "executed_wall": run.executed_flop_per_token * n_params * run.computed_tokens / train_wall / 1e9,
        "executed_cpu": run.executed_flop_per_token * n_params * run.computed_tokens / train_cpu * threads / 1e9,
    }


def max_relative_gap(a: Sequence[float], b: Sequence[float]) -> float:
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def save_plot(runs: dict[str, Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, marker in (("florist-fp32", "o"), ("florist-bf16", "x"), ("florist-bf16-ckpt", "+"), ("reference", "s")):
        if name in runs:
            run = runs[name]
            label = f"{name} (its own random batches)" if name == "reference" else name
            ax.plot(
                range(1, len(run.losses) + 1),
                run.losses,
                marker=marker,
                label=label,
                linestyle="--" if name == "reference" else "-",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("One client's LoRA training, SmolLM2-135M, Dolly client 0")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    runs: dict[str, Run], peaks: dict[str, MatmulPeak], n_params: int, args, machine: str, load_after: str
) -> dict:
    ref = runs.get("reference")
    header = [
        "variant",
        "steps",
        "real tokens",
        "padding",
        "wall s",
        "CPU s",
        "tokens/s (wall)",
        "tokens/s (CPU)",
        "× reference (wall / CPU)",
        "6NT GFLOP/s (CPU)",
        "executed GFLOP/s (CPU)",
        "% of matmul peak (CPU)",
        "% of model-shape matmul (CPU)",
        "peak extra MiB",
    ]
    rows, summary = [], {}
    for name, run in runs.items():
        tps_wall, tps_cpu = tokens_per_second(run)
        f = flops(run, n_params, args.threads)
        peak = peaks["bfloat16" if "bf16" in name else "float32"]
        shaped = peaks[f"{peak.dtype}-model"]
        share = f["executed_cpu"] / peak.gflops_cpu
        ratio = ""
        if ref is not None and run is not ref:
            ref_wall, ref_cpu = tokens_per_second(ref)
            ratio = f"{tps_wall / ref_wall:.2f} / {tps_cpu / ref_cpu:.2f}"
        rows.append(
            [
                name,
                str(run.steps),
                str(run.real_tokens),
                f"{1 - run.real_tokens / run.computed_tokens:.0%}",
                f"{run.wall:.1f}",
                f"{run.cpu:.1f}",
                f"{tps_wall:.0f}",
                f"{tps_cpu:.0f}",
                ratio,
                f"{f['model_6nt_cpu']:.0f}",
                f"{f['executed_cpu']:.0f}",
                f"{share:.1%} of {peak.dtype}",
                f"{f['executed_cpu'] / shaped.gflops_cpu:.1%}",
                f"{run.peak_extra_mib:.0f}",
            ]
        )
        summary[name] = {
            **asdict(run),
            "tokens_per_s_wall": tps_wall,
            "tokens_per_s_cpu": tps_cpu,
            "gflops": f,
            "executed_share_of_peak_cpu": share,
            "executed_share_of_model_shape_cpu": f["executed_cpu"] / shaped.gflops_cpu,
        }
    notes = [
        f"Machine: {machine}; load average after: {load_after}.",
        "Matmul rates (torch.matmul, best burst, before and after the runs), GFLOP/s per CPU-second (wall): "
        + "; ".join(f"{p.label} {p.gflops_cpu:.0f} ({p.gflops_wall:.0f})" for p in peaks.values())
        + ".",
        f"Workload: {args.examples} examples of {args.data.name}, cutoff {args.cutoff}, batch {args.batch_size} "
        f"(micro-batch {args.micro_batch_size}), {args.steps} steps, r {args.rank}, alpha {2 * args.rank}, "
        "q_proj/v_proj, "
        f"dropout 0.05, lr {args.lr}; N = {n_params / 1e6:.1f} M base parameters.",
        "tokens/s count real tokens (padding is lost work). 6NT: model FLOPs over real tokens; executed: 4NT (6NT with "
        "checkpointing) over all computed tokens, padding included, training loop only. CPU figures are per CPU-second "
        "times the threads, which other processes' load hardly changes; wall figures move with the load.",
    ]
    print_table(header, rows, notes, args.markdown)
    out = {
        "machine": machine,
        "load_after": load_after,
        "peaks": {k: v.as_dict() for k, v in peaks.items()},
        "n_params": n_params,
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": summary,
    }
    if "florist-fp32" in runs and "florist-bf16" in runs:
        fp32, bf16 = runs["florist-fp32"].losses, runs["florist-bf16"].losses
        gap = max_relative_gap(fp32, bf16)
        print("\nLoss per step, same seed and batches:")
        print("  florist-fp32: " + " ".join(f"{x:.4f}" for x in fp32))
        print("  florist-bf16: " + " ".join(f"{x:.4f}" for x in bf16))
        print(f"  largest relative difference: {gap:.2%}")
        out["loss_max_relative_gap"] = gap
    if ref is not None:
        print("  reference (its own random batches): " + " ".join(f"{x:.4f}" for x in ref.losses))
    findings(runs, out, args)
    return out


def findings(runs: dict[str, Run], out: dict, args) -> None:
    ref, best = runs.get("reference"), runs.get("florist-bf16")
    if ref is None or best is None:
        return
    ratio_wall = tokens_per_second(best)[0] / tokens_per_second(ref)[0]
    ratio_cpu = tokens_per_second(best)[1] / tokens_per_second(ref)[1]
    share = out["runs"]["florist-bf16"]["executed_share_of_peak_cpu"]
    shaped = out["runs"]["florist-bf16"]["executed_share_of_model_shape_cpu"]
    print(
        f"\nTarget ≥ 1.5× the reference: florist-bf16 is {ratio_wall:.2f}× (wall), {ratio_cpu:.2f}× (CPU): "
        f"{'met' if min(ratio_wall, ratio_cpu) >= 1.5 else 'NOT met'}."
    )
    print(
        f"Target ≥ half the matmul peak: florist-bf16 executes at {share:.1%} of the large bfloat16 matmul rate "
        f"and {shaped:.1%} of the rate at the model's own MLP shape (CPU time): {'met' if share >= 0.5 else 'NOT met'}."
    )
    out["ratio_wall"], out["ratio_cpu"] = ratio_wall, ratio_cpu


def print_table(header, rows, notes, markdown: bool) -> None:
    if markdown:
        for line in notes:
            print(line + "  ")
        print()
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="One client's local training")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    for line in notes:
        print(line)
    Console(width=200).print(table)


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a client file (default: Dolly client 0)")
    p.add_argument("--examples", type=int, default=64, help="first N rows of the file (default 64)")
    p.add_argument("--cutoff", type=int, default=256, help="tokens per example at most (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per variant (default 8: two epochs of 64)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: %(default)s)")
    p.add_argument(
        "--variants",
        default="reference,florist-fp32,florist-bf16",
        help="comma-separated from reference, florist-fp32, florist-bf16, florist-bf16-ckpt",
    )
    p.add_argument("--checkpointing", action="store_true", help="add florist-bf16-ckpt (gradient checkpointing)")
    p.add_argument(
        "--markdown", action="store_true", help="print a markdown table (docs/benchmarks.md is rendered from the JSON)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile the florist variants with torch.profiler (slows them; shares of CPU time only)",
    )
    p.add_argument(
        "--out", type=Path, default=RESULTS, help="where train.json and train_loss.png go (default bench/results)"
    )
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.checkpointing and "florist-bf16-ckpt" not in args.variants:
        args.variants.append("florist-bf16-ckpt")
    known = {"reference", "florist-fp32", "florist-bf16", "florist-bf16-ckpt"}
    if not args.variants or set(args.variants) - known:
        p.error(f"--variants: choose from {', '.join(sorted(known))}")
    if args.batch_size % args.micro_batch_size:
        p.error("--batch-size must be a multiple of --micro-batch-size")
    for name in ("examples", "steps", "threads", "micro_batch_size", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be at least 1")
    if not args.data.is_file():
        p.error(f"--data: {args.data}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    machine = announce_machine(args.threads)
    peaks_before = measure_peaks(args.threads)
    model, tokenizer = load_model()
    n_params = sum(p.numel() for p in model.parameters())
    examples = client_examples(args.data, args.examples, args.cutoff, tokenizer)
    warm_up(model, tokenizer, examples)
    runs: dict[str, Run] = {}
    for variant in args.variants:
        print(f"{variant} ...", file=sys.stderr, flush=True)
        if variant == "reference":
            runs[variant] = train_reference(model, tokenizer, examples, args)
        else:
            runs[variant] = train_florist(
                model,
                tokenizer,
                examples,
                args,
                "float32" if variant == "florist-fp32" else "bfloat16",
                checkpointing=variant.endswith("ckpt"),
            )
    peaks_after = measure_peaks(args.threads)
    peaks = best_peaks(peaks_before, peaks_after)
    out = report(runs, peaks, n_params, args, machine, load_average())
    out["peaks_measured"] = {
        "before": {k: v.as_dict() for k, v in peaks_before.items()},
        "after": {k: v.as_dict() for k, v in peaks_after.items()},
    }
    if args.profile:
        print("\nprofiled run: its timings are slowed by the profiler, so nothing was written", file=sys.stderr)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(out, indent=1))
    save_plot(runs, args.out / "train_loss.png")
    print(f"\nwrote {args.out / 'train.json'} and {args.out / 'train_loss.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
