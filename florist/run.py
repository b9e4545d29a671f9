"""A whole federated run from a ``RunConfig``: model, data, clients, rounds, evaluation, results.

This module only assembles: the loop is in ``server``, training in ``client``, the files in ``rundir``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console

from . import data as datasets_api
from .base_weights import BaseWeights, Delta, adapted_module_names
from .client import DTYPES, LocalTrainer, shared_frozen_a
from .config import RunConfig, parse_thresholds
from .engines.inprocess import InProcessEngine
from .evaluation import evaluate, heldout_loss, load_questions, questions_from_records, weighted_mean
from .models import DEFAULT_MODEL, load_model
from .results import paper_table, rows_from_records, to_csv, to_markdown
from .rundir import RunDirectory, atomic_write_text
from .server import Branch, Federation, RoundRecord, make_branches

console = Console(stderr=True)


def load_client_examples(config: RunConfig, tokenizer) -> tuple[list[list[dict]], list]:
    """Each client's tokenized examples (input_ids, labels) and its raw dataset, from ``config.data``."""
    d = config.data
    clients = datasets_api.load_clients(d.train, d.clients, d.partition, d.alpha, config.seed)
    if d.max_examples_per_client:
        clients = [c.shuffle(seed=config.seed).select(range(min(len(c), d.max_examples_per_client))) for c in clients]
    examples = []
    for c in clients:
        tokenized = datasets_api.tokenize_dataset(c, tokenizer, d.cutoff, d.train_on_inputs, d.template)
        examples.append([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tokenized])
    return examples, clients


def load_eval_questions(config: RunConfig):
    spec = config.eval.questions
    if spec == "none":
        return []
    questions = questions_from_records(datasets_api.builtin_heldout(config.seed), "builtin") if spec == "builtin" else load_questions(spec)
    return questions[: config.eval.limit] if config.eval.limit else questions


class BranchEvaluator:
    """Scores a branch's current model: W0 plus its updates written into the shared base, then restored.

    Heterogeneous FlexLoRA has one model per client; its score is their data-weighted mean, as in the paper.
    Identical adapters (FLoRIST taus that keep the same ranks) are scored once.
    """

    def __init__(self, base: BaseWeights, model, tokenizer, questions, heldout: list[dict], config: RunConfig, client_sizes: Sequence[int]):
        self.base, self.model, self.tokenizer = base, model, tokenizer
        self.questions, self.heldout, self.config = questions, heldout, config
        self.client_sizes = list(client_sizes)
        self._cache: list[tuple[tuple[Delta, ...], dict]] = []

    def __call__(self, branch: Branch | None) -> dict:
        if branch is None:
            return self._score(())
        scheme = self.config.federation.scheme
        last = branch.history[-1]
        per_client = last.per_client is not None and len({tuple(a[n].rank for n in a) for a in last.per_client}) > 1
        if not per_client:
            return self._score(branch.model_deltas(0, scheme))
        scores = [self._score(branch.model_deltas(k, scheme)) for k in range(len(self.client_sizes))]
        return _weighted(scores, self.client_sizes)

    def _score(self, deltas: tuple[Delta, ...]) -> dict:
        for cached_deltas, metrics in self._cache:
            if _same_deltas(cached_deltas, deltas):
                return metrics
        self.base.set_deltas(deltas)
        dtype = DTYPES[self.config.model.dtype]
        device_type = torch.device(self.config.model.device).type
        autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        metrics: dict = {}
        with autocast:
            if self.questions:
                result = evaluate(self.model, self.tokenizer, self.questions, mode=self.config.eval.mode,
                                  batch_size=self.config.eval.batch_size, progress=False)
                metrics.update(result.to_dict())
            if self.heldout:
                metrics["heldout_loss"] = heldout_loss(self.model, self.tokenizer, self.heldout,
                                                       batch_size=self.config.eval.batch_size, progress=False)
        self.base.restore()
        self._cache.append((deltas, metrics))
        return metrics


def _same_deltas(a: tuple[Delta, ...], b: tuple[Delta, ...]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for n in x:
            if x[n] is not y[n] and not (torch.equal(x[n].A, y[n].A) and torch.equal(x[n].B, y[n].B)):
                return False
    return True


def _weighted(scores: list[dict], sizes: list[int]) -> dict:
    total = sum(sizes)
    out = {k: sum(s[k] * n for s, n in zip(scores, sizes)) / total for k in ("accuracy", "micro_accuracy", "heldout_loss") if k in scores[0]}
    out["per_client"] = scores
    return out


def run(config: RunConfig, overwrite: bool = False, progress: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Run (or resume) the federation ``config`` describes; returns the run directory."""
    log = log or (lambda msg: console.print(f"[dim]{msg}[/]"))
    rundir = RunDirectory(config.output, base_model=config.model.name or DEFAULT_MODEL)
    done = rundir.open(config.to_toml(), overwrite=overwrite)
    if done >= config.federation.rounds:
        log(f"{rundir.path}: all {done} rounds already finished")
        write_results(rundir, config)
        return rundir.path
    log(f"loading model {config.model.name or DEFAULT_MODEL}")
    model, tokenizer = load_model(config.model.name, dtype="float32", device=config.model.device)
    log(f"loading and tokenizing data {config.data.train!r}")
    examples, _ = load_client_examples(config, tokenizer)
    sizes = [len(e) for e in examples]
    log("client sizes: " + ", ".join(str(n) for n in sizes))
    base = BaseWeights(model, adapted_module_names(model, config.lora.target_modules))
    shapes = {n: tuple(w.shape) for n, w in base.pristine.items()}
    trainer = LocalTrainer(model, tokenizer.pad_token_id, config.lora, config.train, config.model.dtype,
                           config.model.device, config.model.gradient_checkpointing)
    evaluator = BranchEvaluator(base, model, tokenizer, load_eval_questions(config), _heldout(config, tokenizer), config, sizes)
    branches = make_branches(config.federation.methods, parse_thresholds(config.federation.thresholds))
    rundir.restore_history(branches, done, len(sizes))
    if done == 0:
        log("evaluating the base model (round 0)")
        rundir.append_metrics([_base_record(evaluator(None))])
    federation = Federation(
        InProcessEngine(base, trainer, examples, progress=progress),
        branches,
        ranks=config.client_ranks(),
        alpha_per_rank=config.lora.alpha_per_rank,
        scheme=config.federation.scheme,
        seed=config.seed,
        clients_per_round=config.federation.clients_per_round,
        min_clients=config.federation.min_clients,
        frozen_a=lambda round_number, rank: shared_frozen_a(shapes, rank, config.seed * 7 + round_number),
        evaluate=evaluator,
        on_clients=rundir.save_clients,
        on_round=rundir.save_round,
        log=log,
    )
    for round_number in range(done + 1, config.federation.rounds + 1):
        federation.run_round(round_number)
        log(f"round {round_number} finished and saved")
    write_results(rundir, config)
    return rundir.path


def _heldout(config: RunConfig, tokenizer) -> list[dict]:
    spec = config.eval.heldout
    if not config.eval.heldout_loss or not spec:
        return []
    ds = datasets_api.load_instructions(spec)
    tokenized = datasets_api.tokenize_dataset(ds, tokenizer, config.data.cutoff, True, config.data.template)
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tokenized]


def _base_record(evaluation: dict) -> RoundRecord:
    return RoundRecord(round=0, branch="base", method="base", threshold=None, participants=[], ranks={},
                       communication={}, evaluation=evaluation, train={}, server_seconds=0.0)


def write_results(rundir: RunDirectory, config: RunConfig) -> str:
    """results.md and results.csv from metrics.jsonl; returns the markdown."""
    records = rundir.metrics()
    table = paper_table(rows_from_records(records), config.federation.florist_e_tolerance)
    base = next((r for r in records if r["round"] == 0), None)
    header = f"# Results: {rundir.path}\n\n"
    if base and base["evaluation"].get("accuracy") is not None:
        header += f"Base model (round 0): accuracy {100 * base['evaluation']['accuracy']:.2f}%\n\n"
    markdown = header + to_markdown(table)
    atomic_write_text(rundir.path / "results.md", markdown)
    atomic_write_text(rundir.path / "results.csv", to_csv(table))
    atomic_write_text(rundir.path / "results.json", json.dumps([r.__dict__ for r in table], indent=1))
    return markdown
