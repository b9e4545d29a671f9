#!/usr/bin/env python
"""A GPU check in one command, with nothing to download: one federated round of every method on randomly
initialised TinyLlama- and Llama-7B-shaped models, letter scoring, and the server step on the device.

    python bench/gpu.py                          # on CUDA: both shapes, under 8 minutes on one large GPU
    python bench/gpu.py --models tinyllama       # one shape
    python bench/gpu.py --device cpu --tiny      # the same steps on a 2-layer model in seconds (the tests run it)

For each shape, a ``LlamaForCausalLM`` is built from its config with random weights (seeded; float32 base weights,
bfloat16 autocast, as florist trains; gradient checkpointing for Llama-7B) and the embedded model's tokenizer,
whose 49,152-token vocabulary replaces the shape's own. Then, through florist's own loop (``build_federation`` and
``Federation.run_round`` over the in-process engine, the code ``florist run`` runs):

- **round 1 of every registered method**: 8 clients, each ``--examples`` sequences of ``--seq-len`` random tokens,
  ``--steps`` optimizer steps; tokens/s over every client job, and model FLOPs utilisation: executed FLOPs
  (4·N a token for LoRA on a frozen base, 6·N with checkpointing, N the base's matmul parameters) against the
  bfloat16 matrix-multiply rate measured on the device first;
- **letter scoring** of a synthetic MMLU-shaped question set (4 options, random words): questions/s;
- **the server step on the device**: FLoRIST at τ = 0.9 over the shape's q_proj and v_proj modules, 8 clients at
  r = 16, with the factors on the device, checked against the same step on the CPU;
- **peak device memory** over the round (CUDA's allocator).

Results go to bench/results/gpu.json (``--json``); docs/benchmarks.md says where it has run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import florist  # noqa: F401  (before torch: florist's thread settings must precede OpenMP's start)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from machine import cpu_model, matmul_peak  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from florist.aggregation import ClientUpdate, LoraFactors  # noqa: E402
from florist.base_weights import BaseWeights, adapted_module_names  # noqa: E402
from florist.config import config_from_toml  # noqa: E402
from florist.engines.inprocess import InProcessEngine  # noqa: E402
from florist.evaluation.accuracy import evaluate  # noqa: E402
from florist.evaluation.questions import load_questions  # noqa: E402
from florist.methods import METHODS, aggregate  # noqa: E402
from florist.models import DEFAULT_MODEL, load_tokenizer  # noqa: E402
from florist.rundir import RunDirectory  # noqa: E402
from florist.setup import ServerModel, build_federation, local_trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLIENTS = 8
RANK = 16

# (hidden, intermediate, layers, attention heads, key-value heads) of each shape; q_proj and v_proj as in
# florist.synthetic.MODEL_SHAPES
SHAPES = {
    "tinyllama": ("TinyLlama-1.1B", 2048, 5632, 22, 32, 4),
    "llama-7b": ("Llama-7B", 4096, 11008, 32, 32, 32),
    "tiny": ("tiny (2 layers, hidden 64)", 64, 128, 2, 4, 2),
}
CHECKPOINTED = {"llama-7b"}


def random_model(shape: str, vocab: int, tokenizer, device: str, seed: int) -> LlamaForCausalLM:
    _, hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval()


def matmul_parameters(model: torch.nn.Module) -> int:
    """N of the 4·N / 6·N FLOPs a token: every Linear weight, the LM head included (the embedding is a lookup)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def token_examples(vocab: int, clients: int, count: int, length: int, seed: int) -> list[list[dict]]:
    """Each client's ``count`` sequences of ``length`` random tokens (ids past the special tokens), trained whole."""
    g = torch.Generator().manual_seed(seed)
    return [
        [{"input_ids": ids, "labels": ids} for ids in torch.randint(10, vocab, (count, length), generator=g).tolist()]
        for _ in range(clients)
    ]


def write_questions(path: Path, count: int, seed: int) -> Path:
    """An MMLU-shaped file (cais/mmlu's records) of ``count`` four-option questions in random words."""
    g = torch.Generator().manual_seed(seed)

    def words(n: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 5000, (n,), generator=g))

    records = [
        {"question": words(24), "subject": "synthetic", "choices": [words(4) for _ in range(4)], "answer": k % 4}
        for k in range(count)
    ]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def run_config(args: argparse.Namespace, shape: str, root: Path, questions: Path) -> str:
    methods = ", ".join(f'"{m}"' for m in args.methods)
    return f"""
seed = {args.seed}
output = "{(root / "run").as_posix()}"
[model]
device = "{args.device}"
dtype = "bfloat16"
gradient_checkpointing = {"true" if shape in CHECKPOINTED else "false"}
[data]
clients = {CLIENTS}
cutoff = {args.seq_len}
[lora]
ranks = [{RANK}]
[train]
lr = 3e-4
max_steps = {args.steps}
batch_size = {args.batch}
micro_batch_size = {args.batch}
[federation]
rounds = 1
methods = [{methods}]
thresholds = "0.9"
[eval]
questions = "{questions.as_posix()}"
mode = "letter"
heldout_loss = false
batch_size = {args.batch * 4}
"""


class CountedTraining:
    """Wraps the trainer's ``train``: the tokens and seconds of every client job."""

    def __init__(self, train: Callable):
        self.inner, self.tokens, self.seconds, self.jobs = train, 0, 0.0, 0

    def __call__(self, *args, **kwargs):
        upload, log, kept = self.inner(*args, **kwargs)
        self.tokens, self.seconds, self.jobs = self.tokens + log.tokens, self.seconds + log.seconds, self.jobs + 1
        return upload, log, kept


def federated_round(args, shape: str, model, tokenizer, root: Path, questions: Path) -> dict:
    """Round 1 of every method through florist's loop; the trainer's tokens/s and the round's peak memory."""
    config = config_from_toml(run_config(args, shape, root, questions), "gpu bench")
    examples = token_examples(model.config.vocab_size, CLIENTS, args.examples, args.seq_len, args.seed)
    names = adapted_module_names(model, config.lora.target_modules)
    server = ServerModel(model, tokenizer, BaseWeights(model, names))
    trainer = local_trainer(config, model, tokenizer)
    counted = CountedTraining(trainer.train)
    trainer.train = counted
    engine = InProcessEngine(server.base, trainer, examples, progress=args.progress, log=say)
    rundir = RunDirectory(config.output, base_model=f"random {SHAPES[shape][0]}-shaped")
    rundir.open(config.to_toml())
    reset_peak(args.device)
    began = time.perf_counter()
    with rundir:
        federation = build_federation(config, server, rundir, 0, [len(e) for e in examples], engine, say)
        federation.run_round(1)
    seconds = time.perf_counter() - began
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = {r["method"] for r in records if r["round"] == 1}
    return {
        "round_seconds": seconds,
        "client_jobs": counted.jobs,
        "tokens": counted.tokens,
        "training_seconds": counted.seconds,
        "tokens_per_second": counted.tokens / counted.seconds,
        "methods": sorted(trained),
        "missing_methods": sorted(set(args.methods) - trained),
        "peak_memory_gib": peak_memory_gib(args.device),
    }


def letter_scoring(args, model, tokenizer, questions: Path) -> dict:
    """Questions/s of florist's letter scoring on the base model (once warm)."""
    qs = load_questions(questions)
    evaluate(model, tokenizer, qs[: args.batch * 4], mode="letter", batch_size=args.batch * 4, progress=False)
    sync(args.device)
    began = time.perf_counter()
    result = evaluate(model, tokenizer, qs, mode="letter", batch_size=args.batch * 4, progress=args.progress)
    sync(args.device)
    seconds = time.perf_counter() - began
    return {
        "questions": len(qs),
        "seconds": seconds,
        "questions_per_second": len(qs) / seconds,
        "accuracy": result.accuracy,
    }


def server_step(args, model) -> dict:
    """FLoRIST at τ = 0.9 over the model's q_proj and v_proj with the factors on the device, against the CPU."""
    g = torch.Generator().manual_seed(args.seed)
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    cpu = [
        ClientUpdate(
            {
                n: LoraFactors(
                    torch.randn(RANK, i, generator=g) * i**-0.5, torch.randn(o, RANK, generator=g) * 0.01, 2.0
                )
                for n, (o, i) in shapes.items()
            },
            200 + 50 * k,
            f"client {k}",
        )
        for k in range(CLIENTS)
    ]
    on_device = [
        ClientUpdate(
            {n: LoraFactors(f.A.to(args.device), f.B.to(args.device), f.scaling) for n, f in u.modules.items()},
            u.num_examples,
            u.client_id,
        )
        for u in cpu
    ]
    aggregate("florist", on_device, value=0.9)  # warm: kernels, cuSOLVER handles
    sync(args.device)
    began = time.perf_counter()
    result = aggregate("florist", on_device, value=0.9)
    sync(args.device)
    seconds = time.perf_counter() - began
    reference = aggregate("florist", cpu, value=0.9)
    worst = 0.0
    for name, module in reference.modules.items():
        got = result.modules[name]
        if got.rank != module.rank:
            worst = float("inf")
            break
        diff = (got.B.cpu() @ got.A.cpu() - module.B @ module.A).norm() / (module.B @ module.A).norm()
        worst = max(worst, float(diff))
    return {
        "modules": len(shapes),
        "seconds": seconds,
        "device": str(next(iter(result.modules.values())).B.device),
        "max_rel_difference_from_cpu": worst,
    }


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def measure_shape(args, shape: str, tokenizer, rate: float) -> dict:
    title = SHAPES[shape][0]
    say(f"{title}: building a random model on {args.device}")
    model = random_model(shape, len(tokenizer), tokenizer, args.device, args.seed)
    n = matmul_parameters(model)
    with tempfile.TemporaryDirectory(prefix="florist-gpu-") as tmp:
        root = Path(tmp)
        questions = write_questions(root / "questions.json", args.questions, args.seed)
        say(f"{title}: round 1 of {len(args.methods)} methods, {CLIENTS} clients")
        training = federated_round(args, shape, model, tokenizer, root, questions)
        say(f"{title}: letter scoring {args.questions} questions")
        scoring = letter_scoring(args, model, tokenizer, questions)
    say(f"{title}: the server step on {args.device}")
    step = server_step(args, model)
    flops_per_token = (6 if shape in CHECKPOINTED else 4) * n
    training["mfu"] = training["tokens_per_second"] * flops_per_token / rate
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "shape": shape,
        "title": title,
        "matmul_parameters": n,
        "flops_per_token": flops_per_token,
        "checkpointing": shape in CHECKPOINTED,
        "training": training,
        "scoring": scoring,
        "server_step": step,
    }


HEADER = ["model", "tokens/s", "MFU", "peak GiB", "questions/s", "server step s", "step vs CPU", "round s"]


def rows(results: Sequence[dict]) -> list[list[str]]:
    out = []
    for r in results:
        t, s, q = r["training"], r["server_step"], r["scoring"]
        out.append(
            [
                r["title"] + (" (checkpointing)" if r["checkpointing"] else ""),
                f"{t['tokens_per_second']:,.0f}",
                f"{t['mfu']:.1%}",
                "n/a" if t["peak_memory_gib"] is None else f"{t['peak_memory_gib']:.1f}",
                f"{q['questions_per_second']:.1f}",
                f"{s['seconds']:.3f}",
                f"{s['max_rel_difference_from_cpu']:.1e}",
                f"{t['round_seconds']:.0f}",
            ]
        )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--models", default="tinyllama,llama-7b", help="comma-separated: tinyllama, llama-7b")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and small settings: a check in seconds")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: every method)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per client (default 4; tiny 1)")
    parser.add_argument("--examples", type=int, default=None, help="sequences per client (default 32; tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; tiny 16)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; tiny 2)")
    parser.add_argument("--questions", type=int, default=None, help="questions scored (default 512; tiny 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args(argv)
    defaults = {"steps": (4, 1), "examples": (32, 2), "seq_len": (512, 16), "batch": (8, 2), "questions": (512, 8)}
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1")
    args.models = ["tiny"] if args.tiny else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in SHAPES or m == "tiny"] if not args.tiny else []
    if unknown or not args.models:
        parser.error(f"--models: unknown {unknown[0] if unknown else '(none)'!r}; choose from tinyllama, llama-7b")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        parser.error(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: no CUDA device here (torch {torch.__version__}); try --device cpu --tiny"
        )
    args.progress = sys.stderr.isatty()
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    size = 256 if args.tiny or not args.device.startswith("cuda") else 8192
    say(f"measuring the bfloat16 matmul rate on {args.device} ({size}³)")
    rate = matmul_peak(torch.bfloat16, torch.get_num_threads(), (size,) * 3, 2.0, args.device).gflops_wall * 1e9
    results = [measure_shape(args, shape, tokenizer, rate) for shape in args.models]
    device = device_name(args.device)
    print(f"{device}; bfloat16 matmul {rate / 1e12:.1f} TFLOP/s; torch {torch.__version__}\n")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "|".join("---" for _ in HEADER) + "|")
    for row in rows(results):
        print("| " + " | ".join(row) + " |")
    args.json_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("device", "steps", "examples", "seq_len", "batch", "questions", "seed")}
    summary = {
        "device": device,
        "matmul_tflops": rate / 1e12,
        "torch": torch.__version__,
        "settings": settings,
        "methods": args.methods,
        "table": {"header": HEADER, "rows": rows(results)},
        "results": results,
    }
    args.json_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    say(f"wrote {args.json_path}")


if __name__ == "__main__":
    main()
