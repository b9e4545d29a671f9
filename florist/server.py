"""The federated loop: rounds, client sampling, aggregation, evaluation. Engine-agnostic.

Every method under comparison is a ``Branch`` followed through the rounds. Branches whose
clients would start from the same state (round 1: the same base, fresh adapters) share one
round of client training, so FedIT, FLoRA, FlexLoRA and every FLoRIST threshold are aggregated
from the very same client adapters: the tau sweep costs evaluation time, not training.

An engine trains a list of ``ClientJob``s and returns their updates; the in-process simulator
and the Flower app are two such engines over the same ``LocalTrainer``.

Nothing a client sends is trusted: every update is screened on its own (module names and shapes against the
base model's, dtypes, finiteness, the rank the client was asked for, an optional norm bound) before any
aggregation. A bad update is left out with its reason recorded; a round that keeps fewer than ``min_clients``
updates fails as a whole (``RoundFailed``) before anything of it is written, so the run can be resumed.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .aggregation import (
    AggregationError,
    AggregationMethod,
    AggregationResult,
    ClientUpdate,
    FLoRIST,
    LoraFactors,
    asked_scalings,
    check_result,
    get_method,
    prepare,
    screen_updates,
    sweep,
)
from .base_weights import Delta
from .client import ClientStart, TrainingLog
from .communication import round_communication
from .config import ConfigError
from .results import branch_label


@dataclass(frozen=True)
class ClientJob:
    """One client's training this round: its data index, where its LoRA starts, and the base it trains on."""

    client: int
    start: ClientStart
    base_deltas: tuple[Delta, ...] = ()


@dataclass
class ClientResult:
    client: int
    update: ClientUpdate
    log: TrainingLog


class Engine(Protocol):
    """Trains a round's jobs. An engine may also keep ``failures``, {client: reason} for the jobs of its latest
    ``train`` call that it left out; the round's record then says why each of those clients is missing."""

    def train(self, round_number: int, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        """Train every job; results in job order. Jobs whose client failed may be missing."""


class RoundFailed(RuntimeError):
    """Too few clients replied; the round left nothing behind and the run can be resumed."""


@dataclass
class Branch:
    """One aggregation method (FLoRIST at one tau) and the global results of its finished rounds."""

    label: str
    method: AggregationMethod
    threshold: float | None = None
    history: list[AggregationResult] = field(default_factory=list)

    def base_deltas(self, client: int, scheme: str) -> tuple[Delta, ...]:
        """Merge scheme: every past global update is merged into this client's base."""
        return tuple(r.for_client(client) for r in self.history) if scheme == "merge" else ()

    def init_adapter(self, client: int, scheme: str) -> Delta | None:
        """Re-init scheme: the client's LoRA starts from the latest global adapter."""
        return self.history[-1].for_client(client) if scheme == "reinit" and self.history else None

    def model_deltas(self, client: int, scheme: str) -> tuple[Delta, ...]:
        """The updates that make up client ``client``'s model now: all merged rounds, or the latest adapter."""
        if scheme == "merge":
            return tuple(r.for_client(client) for r in self.history)
        return (self.history[-1].for_client(client),) if self.history else ()

    def training_key(self) -> tuple:
        """Branches with equal keys start their clients identically and can share their training."""
        return ("fresh", self.method.sends_a) if not self.history else ("own", self.label)


@dataclass
class TrainingGroup:
    """Branches that share one round of client training, and the jobs that training consists of."""

    name: str  # "shared", "ffa", or a branch label once branches have diverged
    branches: list[Branch]
    jobs: list[ClientJob]


def make_branches(methods: Sequence[str], thresholds: Sequence[float]) -> list[Branch]:
    """A branch per method, FLoRIST's one per tau. Two branches of one name are refused: they would share a
    directory and a results row, and one would overwrite the other."""
    branches = []
    for name in methods:
        if name == FLoRIST.name:
            branches += [Branch(branch_label(name, t), FLoRIST(t), t) for t in thresholds]
        else:
            branches.append(Branch(branch_label(name), get_method(name)))
    twice = [label for label, n in Counter(b.label for b in branches).items() if n > 1]
    if twice:
        raise ConfigError(f"branch {twice[0]!r} is asked for twice (federation.methods or federation.thresholds)")
    return branches


def sample_clients(num_clients: int, per_round: int, seed: int, round_number: int) -> list[int]:
    """The clients taking part in a round, drawn from the run's seed and the round number (all if per_round is 0)."""
    if per_round in (0, num_clients):
        return list(range(num_clients))
    return sorted(random.Random(seed * 7919 + round_number).sample(range(num_clients), per_round))


def client_seed(seed: int, round_number: int, client: int) -> int:
    """Each client's seed for its LoRA init and data order: the same for every branch, so training can be shared."""
    return seed * 1_000_003 + round_number * 1009 + client


@dataclass
class RoundRecord:
    """One branch's outcome in one round (round 0: the base model)."""

    round: int
    branch: str
    method: str
    threshold: float | None
    participants: list[int]
    ranks: dict[str, int]
    communication: dict
    evaluation: dict
    train: dict
    server_seconds: float
    rejected: dict[str, str] = field(default_factory=dict)  # client index -> why its update was left out

    def to_dict(self) -> dict:
        return self.__dict__.copy()


class Federation:
    """Runs the rounds. ``evaluate(branch_deltas_per_client, weights)`` scores a model state and returns metrics.

    ``frozen_a(round_number)`` gives FFA-LoRA's shared A for a round; ``save_clients`` and ``save_round``
    persist what a round produced (the run directory does it; tests may pass no-ops).
    ``module_shapes`` ({module: (out, in)}, the base model's adapted weights) is what every update is screened
    against; without it updates are checked against each other only. ``max_update_norm`` bounds each module's
    ``||s B A||_F`` (0: no bound).
    """

    def __init__(
        self,
        engine: Engine,
        branches: list[Branch],
        *,
        ranks: Sequence[int],
        alpha_per_rank: float,
        scheme: str,
        seed: int,
        clients_per_round: int,
        min_clients: int,
        frozen_a: Callable[[int, int], dict],
        evaluate: Callable[[Branch | None], dict],
        on_clients: Callable[[int, str, list[ClientResult]], None] = lambda *a: None,
        on_round: Callable[[int, list[Branch], list[RoundRecord]], None] = lambda *a: None,
        log: Callable[[str], None] = print,
        module_shapes: Mapping[str, tuple[int, int]] | None = None,
        max_update_norm: float = 0.0,
        use_rslora: bool | None = None,
    ):
        self.engine, self.branches = engine, branches
        self.use_rslora = use_rslora  # which PEFT scaling rule a job's alpha and rank give; None: either
        self.module_shapes, self.max_update_norm = module_shapes, max_update_norm
        self.ranks, self.alpha_per_rank = list(ranks), alpha_per_rank
        self.scheme, self.seed = scheme, seed
        self.clients_per_round, self.min_clients = clients_per_round, min_clients
        self.frozen_a, self.evaluate = frozen_a, evaluate
        self.on_clients, self.on_round, self.log = on_clients, on_round, log

    def run_round(self, round_number: int) -> list[RoundRecord]:
        """Plan the round, have the engine train every group's jobs, aggregate, evaluate, persist."""
        groups = self.plan_round(round_number)
        results, failures = {}, {}
        for g in groups:
            self.log(
                f"round {round_number}: training {len(g.jobs)} clients for {', '.join(b.label for b in g.branches)}"
            )
            results[g.name] = self.engine.train(round_number, g.jobs)
            failures[g.name] = dict(getattr(self.engine, "failures", {}))
        return self.finish_round(round_number, groups, results, failures)

    def plan_round(self, round_number: int) -> list[TrainingGroup]:
        """Sample this round's clients and group the branches that can share their training."""
        sampled = sample_clients(len(self.ranks), self.clients_per_round, self.seed, round_number)
        by_key: dict[tuple, list[Branch]] = {}
        for b in self.branches:
            by_key.setdefault(b.training_key(), []).append(b)
        groups = []
        for key, branches in by_key.items():
            name = ("shared" if key[1] else "ffa") if key[0] == "fresh" else key[1]
            groups.append(TrainingGroup(name, branches, [self._job(branches[0], k, round_number) for k in sampled]))
        return groups

    def finish_round(
        self,
        round_number: int,
        groups: Sequence[TrainingGroup],
        results: dict[str, list[ClientResult]],
        failures: Mapping[str, Mapping[int, str]] | None = None,
    ) -> list[RoundRecord]:
        """Screen every update, aggregate every branch from its group's accepted ones, score, persist.

        ``failures``: per group, why the clients without a result have none (the engine's word). Raises
        ``RoundFailed``, having written nothing, when a group keeps fewer than ``min_clients`` updates or its
        updates cannot be aggregated, which includes an aggregate with a NaN or Inf in it: every branch's result
        is computed and checked before any is kept, scored or written.
        """
        screened = {
            g.name: self._screen(round_number, g, results.get(g.name, []), (failures or {}).get(g.name, {}))
            for g in groups
        }
        for g in groups:
            accepted, rejected = screened[g.name]
            if len(accepted) < max(1, self.min_clients):
                replied = len({r.client for r in results.get(g.name, [])} & {j.client for j in g.jobs})
                why = "; ".join(f"client {c}: {reason}" for c, reason in rejected.items())
                raise RoundFailed(
                    f"round {round_number}: {replied} of {len(g.jobs)} clients replied for {g.name} "
                    f"and {len(accepted)} updates passed the checks, fewer than min_clients={self.min_clients}"
                    + (f" ({why})" if why else "")
                )
        kept = {b.label: len(b.history) for b in self.branches}
        try:
            aggregated = {g.name: self._aggregate(g.branches, screened[g.name][0]) for g in groups}
            records = []
            for g in groups:
                (accepted, rejected), (prepared, outcomes) = screened[g.name], aggregated[g.name]
                for b, result, seconds in outcomes:
                    b.history.append(result)
                    records.append(self._record(round_number, b, accepted, prepared, result, seconds, rejected))
        except BaseException as e:
            for b in self.branches:  # the round never happened: no branch keeps a result of it
                del b.history[kept[b.label] :]
            if isinstance(e, AggregationError):
                raise RoundFailed(f"round {round_number}: {e}") from None
            raise
        for g in groups:
            self.on_clients(round_number, g.name, screened[g.name][0])
        self.on_round(round_number, self.branches, records)
        return records

    def _screen(
        self, round_number: int, group: TrainingGroup, results: Sequence[ClientResult], failures: Mapping[int, str]
    ) -> tuple[list[ClientResult], dict[str, str]]:
        """This group's results that pass every check, and {client: reason} for each job left out.

        Each update is held to what its job asked for: the base model's modules and shapes, at most the job's rank,
        the scaling PEFT gives the job's alpha and rank (either rule where the run does not say whether rsLoRA is on),
        and under a frozen A (FFA-LoRA) the job's A replaces whatever the update holds, as the Flower engine does.
        """
        start_of = {job.client: job.start for job in group.jobs}

        def own_a(modules: Mapping, start: ClientStart) -> Mapping:
            if start.frozen_a is None or not isinstance(modules, Mapping):
                return modules
            return {
                name: LoraFactors(start.frozen_a[name][: start.rank].float().clone(), f.B, f.scaling)
                if isinstance(f, LoraFactors) and name in start.frozen_a
                else f
                for name, f in modules.items()
            }

        # the server names each update by the job it answers: a client cannot pass itself off as another
        results = [
            ClientResult(
                r.client,
                ClientUpdate(own_a(r.update.modules, start_of[r.client]), r.update.num_examples, f"client {r.client}"),
                r.log,
            )
            for r in results
            if r.client in start_of
        ]
        starts = [start_of[r.client] for r in results]
        accepted, reasons = screen_updates(
            [r.update for r in results],
            self.module_shapes,
            max_ranks=[s.rank for s in starts],
            scalings=[asked_scalings(s.alpha, s.rank, self.use_rslora) for s in starts],
            max_norm=self.max_update_norm,
        )
        replied = {r.client for r in results}
        rejected = {
            str(job.client): failures.get(job.client, "no update: the client failed or did not reply")
            for job in group.jobs
            if job.client not in replied
        }
        for k, reason in reasons.items():
            rejected[str(results[k].client)] = reason
        for client, reason in rejected.items():
            self.log(f"round {round_number} ({group.name}): left out client {client}: {reason}")
        return [results[k] for k in accepted], dict(sorted(rejected.items(), key=lambda x: int(x[0])))

    def _job(self, branch: Branch, client: int, round_number: int) -> ClientJob:
        rank = self.ranks[client]
        start = ClientStart(
            rank=rank,
            alpha=self.alpha_per_rank * rank,
            seed=client_seed(self.seed, round_number, client),
            init=branch.init_adapter(client, self.scheme),
            frozen_a=None if branch.method.sends_a else self.frozen_a(round_number, max(self.ranks)),
        )
        return ClientJob(client, start, branch.base_deltas(client, self.scheme))

    def _aggregate(
        self, branches: list[Branch], results: list[ClientResult]
    ) -> tuple[list[ClientUpdate], list[tuple[Branch, AggregationResult, float]]]:
        """The prepared updates and, per branch, its checked result and server seconds; nothing is kept here, so an
        ``AggregationError`` (a result with NaN or Inf, a failed decomposition) leaves every branch as it was."""
        updates = [r.update for r in results]
        prepared, weights = prepare(updates, max_norm=self.max_update_norm)
        florist_branches = [b for b in branches if b.threshold is not None]
        start = time.perf_counter()
        swept = sweep(prepared, weights, [b.threshold for b in florist_branches]) if florist_branches else {}
        sweep_seconds = (time.perf_counter() - start) / max(1, len(florist_branches))
        outcomes = []
        for b in branches:
            start = time.perf_counter()
            result = swept[b.threshold] if b.threshold is not None else b.method.aggregate(prepared, weights)
            seconds = sweep_seconds if b.threshold is not None else time.perf_counter() - start
            check_result(result, max_norm=self.max_update_norm, clients=[f"client {r.client}" for r in results])
            # a client's index in this round's results, for per-client adapters, is its position in `results`
            outcomes.append((b, _index_by_client(result, [r.client for r in results], len(self.ranks)), seconds))
        return prepared, outcomes

    def _record(self, round_number, branch, results, prepared, result, seconds, rejected) -> RoundRecord:
        comm = round_communication(branch.method, prepared, _compact(result, [r.client for r in results]))
        losses = [r.log.losses[-1] for r in results if r.log.losses]
        began = time.perf_counter()
        evaluation = self.evaluate(branch)
        self.log(
            f"round {round_number}: {branch.label} scored in {time.perf_counter() - began:.0f} s{_scores(evaluation)}"
        )
        return RoundRecord(
            round=round_number,
            branch=branch.label,
            method=branch.method.name,
            threshold=branch.threshold,
            participants=[r.client for r in results],
            ranks=result.ranks,
            communication=comm.to_dict(),
            evaluation=evaluation,
            train={
                "final_loss_mean": sum(losses) / len(losses) if losses else None,
                "tokens": sum(r.log.tokens for r in results),
                "seconds": sum(r.log.seconds for r in results),
            },
            server_seconds=seconds,
            rejected=dict(rejected),
        )


def _scores(evaluation: dict) -> str:
    parts = []
    if evaluation.get("accuracy") is not None:
        parts.append(f"accuracy {100 * evaluation['accuracy']:.2f}%")
    if evaluation.get("heldout_loss") is not None:
        parts.append(f"held-out loss {evaluation['heldout_loss']:.4f}")
    return ": " + ", ".join(parts) if parts else ""


def _index_by_client(result: AggregationResult, clients: list[int], num_clients: int) -> AggregationResult:
    """Re-key per-client adapters from this round's reply order to client indices (non-participants get the global)."""
    if result.per_client is None:
        return result
    per_client = [result.modules] * num_clients
    for position, client in enumerate(clients):
        per_client[client] = result.per_client[position]
    return AggregationResult(result.method, result.modules, per_client, result.weights)


def _compact(result: AggregationResult, clients: list[int]) -> AggregationResult:
    """The inverse view: per-client adapters in reply order, for accounting over this round's participants."""
    if result.per_client is None:
        return result
    return AggregationResult(result.method, result.modules, [result.per_client[c] for c in clients], result.weights)
