"""Assembling a run from its ``RunConfig``: the server's model, the clients' data, the evaluator, the loop.

Both engines build on these (the in-process simulator in ``florist.run``, the Flower apps in
``florist.engines``); nothing here runs a round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from . import data as datasets_api
from .aggregation import Adapter
from .base_weights import BaseWeights, adapted_module_names
from .client import LocalTrainer
from .config import ConfigError, RunConfig, heldout_source, upload_taus
from .evaluation import EvalResult, evaluate, heldout_loss, load_questions, questions_from_records, weighted_mean
from .jobs import BaseDelta
from .methods import get_method
from .models import (
    DEFAULT_MODEL,
    DTYPES,
    check_device,
    empty_model,
    ensure_embedded_model,
    load_model,
    load_model_config,
)
from .results import ResultRow, paper_table, rows_from_records, to_csv, to_markdown
from .rundir import RunDirectory, atomic_write_text
from .server import (
    Branch,
    Engine,
    Federation,
    RoundHooks,
    RoundRecord,
    RoundSettings,
    UpdateChecks,
    make_branches,
    scores_line,
)


def load_client_examples(config: RunConfig, tokenizer, progress: bool = False) -> tuple[list[list[dict]], list]:
    """Each client's tokenized examples (input_ids, labels) and its raw dataset, from ``config.data``."""
    d = config.data
    clients = datasets_api.load_clients(d.train, d.clients, d.partition, d.alpha, config.seed, resplit=d.resplit)
    clients = [_limit(config, c) for c in clients]
    tokenized = [_tokenized(config, c, tokenizer, progress, f"tokenizing client {k}") for k, c in enumerate(clients)]
    return tokenized, clients


def load_partition_examples(config: RunConfig, tokenizer, client: int, progress: bool = False) -> list[dict]:
    """Client ``client``'s examples alone, equal to ``load_client_examples(...)[0][client]``.

    From a folder of client files only that client's file is read; any other source is split as for the
    whole federation (the split is seeded) and only this client's part is kept.
    """
    d = config.data
    rows = datasets_api.load_client(d.train, d.clients, client, d.partition, d.alpha, config.seed, resplit=d.resplit)
    return _tokenized(config, _limit(config, rows), tokenizer, progress, f"tokenizing client {client}")


def _limit(config: RunConfig, rows):
    n = config.data.max_examples_per_client
    return rows.shuffle(seed=config.seed).select(range(min(len(rows), n))) if n else rows


def _tokenized(config: RunConfig, rows, tokenizer, progress: bool, description: str) -> list[dict]:
    d = config.data
    tokenized = datasets_api.tokenize_dataset(
        rows, tokenizer, d.cutoff, d.train_on_inputs, d.template, progress=progress, description=description
    )
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tokenized]


def load_eval_questions(config: RunConfig):
    spec = config.eval.questions
    if spec == "none":
        return []
    questions = (
        questions_from_records(datasets_api.builtin_heldout(config.seed), "builtin")
        if spec == "builtin"
        else load_questions(spec)
    )
    return questions[: config.eval.limit] if config.eval.limit else questions


class BranchEvaluator:
    """Scores a branch's current model: W0 plus its updates written into the shared base, then restored.

    A method that gives each client its own adapter (heterogeneous FlexLoRA's truncations, FedSA-LoRA's global A
    with each client's own B) has one model per client; its score is their data-weighted mean, as in the papers.
    Identical adapters (FLoRIST taus that keep the same ranks) are scored once.
    """

    def __init__(
        self,
        base: BaseWeights,
        model,
        tokenizer,
        questions,
        heldout: list[dict],
        config: RunConfig,
        client_sizes: Sequence[int],
    ):
        self.base, self.model, self.tokenizer = base, model, tokenizer
        self.questions, self.heldout, self.config = questions, heldout, config
        self.client_sizes = list(client_sizes)
        self._cache: list[tuple[tuple[Adapter, ...], Scores]] = []
        self._round = 0

    def __call__(self, branch: Branch | None) -> dict:
        done = len(branch.history) if branch is not None else 0
        if done != self._round:  # identical adapters are of one round: older scores are never asked for again
            self._cache, self._round = [], done
        if branch is None:
            return self._metrics([self._score(())])
        last = branch.history.last
        alike = last.per_client is None or all(_same_deltas((a,), (last.modules,)) for a in last.per_client)
        if alike:
            return self._metrics([self._score(branch.model_deltas(0))])
        return self._metrics([self._score(branch.model_deltas(k)) for k in range(len(self.client_sizes))])

    def _metrics(self, scores: list[Scores]) -> dict:
        """One model's metrics, or several models' data-weighted mean with each model's own under ``per_client``."""
        if len(scores) == 1:
            return scores[0].to_dict()
        sizes = self.client_sizes
        mean = Scores(
            weighted_mean([s.questions for s in scores], sizes) if scores[0].questions else None,
            sum(s.heldout * n for s, n in zip(scores, sizes)) / sum(sizes) if scores[0].heldout is not None else None,
        )
        return mean.to_dict() | {"per_client": [s.to_dict() for s in scores]}

    def _score(self, model: tuple[BaseDelta, ...]) -> Scores:
        deltas = tuple(d.load() for d in model)
        for cached_deltas, scores in self._cache:
            if _same_deltas(cached_deltas, deltas):
                return scores
        dtype = DTYPES[self.config.model.dtype]
        device_type = torch.device(self.config.model.device).type
        autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        scores = Scores()
        with self.base.holding(deltas), autocast:
            if self.questions:
                scores.questions = evaluate(
                    self.model,
                    self.tokenizer,
                    self.questions,
                    mode=self.config.eval.mode,
                    batch_size=self.config.eval.batch_size,
                    progress=False,
                )
            if self.heldout:
                scores.heldout = heldout_loss(
                    self.model, self.tokenizer, self.heldout, batch_size=self.config.eval.batch_size, progress=False
                )
        self._cache.append((deltas, scores))
        return scores


@dataclass
class Scores:
    """One model's scores: on the question set, and its held-out loss (None: not asked for)."""

    questions: EvalResult | None = None
    heldout: float | None = None

    def to_dict(self) -> dict:
        metrics = self.questions.to_dict() if self.questions is not None else {}
        return metrics | ({"heldout_loss": self.heldout} if self.heldout is not None else {})


def _same_deltas(a: tuple[Adapter, ...], b: tuple[Adapter, ...]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for n in x:
            if x[n] is not y[n] and not (torch.equal(x[n].A, y[n].A) and torch.equal(x[n].B, y[n].B)):
                return False
    return True


@dataclass
class ServerModel:
    """The base model the server scores every branch with (in-process, the clients train on it too)."""

    model: Any
    tokenizer: Any
    base: BaseWeights


def check_model_config(config: RunConfig) -> None:
    """What can be checked of ``config.model`` and ``config.lora`` before any weights load, in a second or so:
    the device exists here, ``data.cutoff`` fits the model's context, and ``lora.target_modules`` names Linear
    layers of the model's architecture (read from the model's config alone). A ConfigError naming the key, or a
    ModelLoadError for a model that cannot be read."""
    check_device(config.model.device)
    model_config = load_model_config(config.model.name)
    context = getattr(model_config, "max_position_embeddings", None)
    if isinstance(context, int) and config.data.cutoff > context:  # longer examples would pass the model's positions
        raise ConfigError(
            f"config key 'data.cutoff' is {config.data.cutoff}, beyond the {context} tokens the model "
            f"reads at once; set it to {context} or less"
        )
    adapted_module_names(empty_model(model_config), config.lora.target_modules)


def load_server_model(config: RunConfig, log: Callable[[str], None], load: Callable | None = None) -> ServerModel:
    """``load``: a replacement for ``florist.models.load_model`` (same call), e.g. a test's tiny model.

    ``check_model_config`` runs first, so that a deployment's server refuses a bad config before loading weights.
    """
    check_model_config(config)
    log(f"loading model {config.model.name or DEFAULT_MODEL}")
    if load is None and (config.model.name or DEFAULT_MODEL) == DEFAULT_MODEL:
        ensure_embedded_model(log)  # its one-time conversion is told through the run's log (silent with --quiet)
    model, tokenizer = (load or load_model)(config.model.name, dtype="float32", device=config.model.device)
    return ServerModel(model, tokenizer, BaseWeights(model, adapted_module_names(model, config.lora.target_modules)))


def local_trainer(config: RunConfig, model, tokenizer) -> LocalTrainer:
    return LocalTrainer(
        model,
        tokenizer.pad_token_id,
        config.lora,
        config.train,
        config.model.dtype,
        config.model.device,
        config.model.gradient_checkpointing,
    )


def check_branches(branches: Sequence[Branch], ranks: Sequence[int], shapes) -> None:
    """Refuse, before any training, a run that asks a method for what it cannot do (``Method.check``)."""
    for b in branches:
        problem = b.method.check(ranks, shapes)
        if problem:
            raise ConfigError(f"federation.methods: {b.method.name} {problem}")


def build_federation(
    config: RunConfig,
    server: ServerModel,
    rundir: RunDirectory,
    done: int,
    client_sizes: Sequence[int],
    engine: Engine,
    log: Callable[[str], None],
    *,
    progress: bool = False,
) -> Federation:
    """The loop, ready for ``engine``: branches restored from the run directory, the evaluator, round 0 scored.

    ``progress``: show the tokenizing of the held-out examples.
    """
    shapes = {n: tuple(w.shape) for n, w in server.base.pristine.items()}
    evaluator = BranchEvaluator(
        server.base,
        server.model,
        server.tokenizer,
        load_eval_questions(config),
        _heldout(config, server.tokenizer, progress),
        config,
        client_sizes,
    )
    branches = make_branches(
        config.federation.methods,
        {name: get_method(name).values(config) for name in config.federation.methods},
        config.federation.scheme,
        config.method,
        upload_taus(config),
        config.federation.rounds,
    )
    check_branches(branches, config.client_ranks(), shapes)
    rundir.restore_history(branches, done, len(client_sizes))
    if done == 0:
        log("evaluating the base model (round 0)")
        began = time.perf_counter()
        base = _base_record(evaluator(None))
        log(f"round 0: the base model scored in {time.perf_counter() - began:.0f} s{scores_line(base.evaluation)}")
        rundir.append_metrics([base])
    return Federation(
        engine,
        branches,
        RoundSettings(
            ranks=config.client_ranks(),
            alpha_per_rank=config.lora.alpha_per_rank,
            scheme=config.federation.scheme,
            seed=config.seed,
            clients_per_round=config.federation.clients_per_round,
            min_clients=config.federation.min_clients,
            rounds=config.federation.rounds,
            evaluate_every=config.eval.every,
            lr=config.train.lr,
        ),
        UpdateChecks(shapes, config.federation.max_update_norm, config.lora.use_rslora),
        RoundHooks(evaluate=evaluator, on_clients=rundir.save_clients, on_round=rundir.save_round, log=log),
    )


def _heldout(config: RunConfig, tokenizer, progress: bool = False) -> list[dict]:
    spec = heldout_source(config.eval.heldout, config.data.train)
    if not config.eval.heldout_loss or not spec:
        return []
    if spec == "builtin":  # the answers alone: the questions are a template the model would learn anyway
        ds, whole_text = datasets_api.builtin_heldout_answers(config.seed), False
    else:
        ds, whole_text = datasets_api.load_instructions(spec), True
    tokenized = datasets_api.tokenize_dataset(
        ds,
        tokenizer,
        config.data.cutoff,
        whole_text,
        config.data.template,
        progress=progress,
        description="tokenizing held-out examples",
    )
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tokenized]


def _base_record(evaluation: dict) -> RoundRecord:
    return RoundRecord(
        round=0,
        branch="base",
        method="base",
        threshold=None,
        participants=[],
        ranks={},
        communication={},
        evaluation=evaluation,
        train={},
        server_seconds=0.0,
    )


def results(rundir: RunDirectory, config: RunConfig) -> tuple[list[ResultRow], float | None]:
    """The results table of the rounds in metrics.jsonl, and the base model's accuracy (round 0; None if unscored)."""
    records = rundir.metrics()
    table = paper_table(rows_from_records(records), config)
    base = next((r for r in records if r["round"] == 0), None)
    return table, None if base is None else base["evaluation"].get("accuracy")


def write_results(rundir: RunDirectory, config: RunConfig) -> str:
    """results.md and results.csv from metrics.jsonl; returns the markdown."""
    table, base_accuracy = results(rundir, config)
    header = f"# Results: {rundir.path}\n\n"
    if base_accuracy is not None:
        header += f"Base model (round 0): accuracy {100 * base_accuracy:.2f}%\n\n"
    markdown = header + to_markdown(table)
    atomic_write_text(rundir.path / "results.md", markdown)
    atomic_write_text(rundir.path / "results.csv", to_csv(table))
    atomic_write_text(rundir.path / "results.json", json.dumps([r.__dict__ for r in table], indent=1))
    return markdown
