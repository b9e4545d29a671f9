"""The federated loop: rounds, client sampling, aggregation, evaluation. One loop for every engine.

Every method under comparison is a ``Branch`` followed through the rounds (a swept method, FLoRIST, one branch per
value). Branches whose clients would start from the same state (round 1: the same base, fresh adapters, the same
``ClientMode``) share one round of client training, so FedIT, FLoRA, FlexLoRA and every FLoRIST τ are aggregated
from the very same client adapters: the τ sweep costs evaluation time, not training.

A round is five steps, each a method of ``Federation``: plan the jobs (``plan_round``), have the engine train them
(``Engine.train``, which returns the replies and why each missing one is missing), screen every reply
(``screen``), aggregate every branch (``aggregate``), then score and keep the results (``keep``).

Nothing a client sends is trusted: every upload is completed from what the server sent (a client cannot change a
factor it was told to hold fixed) and screened on its own (module names and shapes against the base model's,
dtypes, finiteness, the rank the client was asked for, the scaling its alpha gives, an optional norm bound) before
any aggregation. A bad update is left out with its reason recorded; a round that keeps fewer than ``min_clients``
updates fails as a whole (``RoundFailed``) before anything of it is written, so the run can be resumed.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from .aggregation import (
    AggregationError,
    AggregationResult,
    ClientUpdate,
    as_dtype,
    asked_scalings,
    check_result,
    compute_dtype,
    gradient_problem,
    normalized_weights,
    screen_updates,
)
from .aggregation.truncation import recut, truncated_pair, truncation_problem
from .communication import part_params, round_communication, with_catchup, with_spectra, with_start_traffic
from .history import RESIDUAL, History
from .jobs import (
    BOTH_FACTORS,
    GRADIENT,
    Adapter,
    BaseDelta,
    ClientJob,
    ClientMode,
    ClientReply,
    ClientResult,
    ClientStart,
    Factors,
    RoundReplies,
    completed_factors,
    leading,
    seed_for,
    shared_factors,
)
from .methods import Method, RoundContext, get_method, in_order
from .methods.base import format_value


class Engine(Protocol):
    """Trains one round's jobs wherever the clients are: in this process, or on Flower SuperNodes."""

    def train(self, round_number: int, jobs: Sequence[ClientJob]) -> RoundReplies:
        """Every job's reply (naming the job's group), or why there is none (``RoundReplies.failures``, keyed by group
        and client). A client may have a job in several groups of a round."""


class RoundFailed(RuntimeError):
    """Too few clients replied; the round left nothing behind and the run can be resumed."""


@dataclass
class Branch:
    """One method (at one value of its swept parameter) and the global results of its finished rounds.

    ``scheme`` says how its next round starts: ``merge`` (every past global update merged into the base, a fresh
    LoRA) or ``reinit`` (the LoRA starts from the latest global adapter). Either way a result's ``residual`` stays in
    the base from its round on.
    """

    label: str
    method: Method
    value: float | None = None
    history: History = field(default_factory=History)
    scheme: str = "merge"
    upload_threshold: float = 1.0  # its clients upload the fewest components reaching this energy (1: whole pairs)

    def base_deltas(self, client: int) -> tuple[BaseDelta, ...]:
        """What client ``client``'s frozen base holds beyond W0: the past residuals, and under merge every past
        global update, each named for good and read from the history only when an engine needs it."""
        deltas: list[BaseDelta] = []
        for r in range(1, len(self.history) + 1):
            parts = [RESIDUAL] if self.history.summary(r).residual else []
            if self.scheme == "merge":
                parts.append(self.history.part_for(r, client))
            deltas += [self._delta(r, part) for part in parts]
        return tuple(deltas)

    def _delta(self, round_number: int, part: str) -> BaseDelta:
        history = self.history
        return BaseDelta(f"{self.label}/{round_number:03d}/{part}", lambda: history.adapter(round_number, part))

    def init_adapter(self, client: int) -> Adapter | None:
        """Re-init scheme: the client's LoRA starts from the latest global adapter."""
        return self.history.last.for_client(client) if self.scheme == "reinit" and self.history else None

    def model_deltas(self, client: int) -> tuple[BaseDelta, ...]:
        """The updates that make up client ``client``'s model now: its base's, and under reinit the latest adapter."""
        latest = len(self.history)
        reinit = self.scheme == "reinit" and self.history
        init = (self._delta(latest, self.history.part_for(latest, client)),) if reinit else ()
        return self.base_deltas(client) + init

    def catchup_params(self, client: int, round_number: int) -> int:
        """What client ``client`` fetches at the start of ``round_number`` besides what it was sent before: the parts
        of its model made in the rounds since it last took part (each round's result went at once only to the
        clients it aggregated), counted as each round counted them (``RoundSummary.part_params``)."""
        total = 0
        for r in range(round_number - 1, 0, -1):
            summary = self.history.summary(r)
            if client in summary.participants:
                break
            parts = [RESIDUAL] if summary.residual else []
            if self.scheme == "merge" or r == round_number - 1:  # under reinit only the latest adapter is needed
                parts.append(self.history.part_for(r, client))
            total += sum(summary.part_params.get(p, 0) for p in parts)
        return total

    def training_key(self, round_number: int, ranks: Sequence[int]) -> tuple:
        """Branches with equal keys start their clients identically (fresh, one mode, the same ranks) and can share
        their training."""
        if self.history:
            return ("own", self.label)
        own = tuple(self.method.client_rank(r, self.history, k) for k, r in enumerate(ranks))
        return ("fresh", self.method.mode(round_number), own)


@dataclass
class TrainingGroup:
    """Branches that share one round of client training, and the jobs that training consists of."""

    name: str  # "shared" (both factors, fresh), a method's name (its own mode, fresh), or a branch label
    branches: list[Branch]
    jobs: list[ClientJob]


def make_branches(
    methods: Sequence[str],
    values: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    scheme: str = "merge",
    options: Mapping[str, Mapping[str, object]] | None = None,
    upload_thresholds: Sequence[float] = (1.0,),
    rounds: int = 1,
) -> list[Branch]:
    """A branch per method, a swept method's one per value: ``values`` lists them for every swept method, or maps a
    method's name to its own (a swept method not named gets its sweep's default). ``scheme`` is the run's, for the
    methods that leave it open; ``options`` maps a method's name to its options (``Method.configured``). Each branch
    is made at every one of ``upload_thresholds`` its method can cut its uploads at in ``rounds`` rounds
    (``Method.upload_cut_problem``; 1 always). Two branches of one name are refused: they would share a directory and
    a results row, and one would overwrite the other."""
    branches = []
    for name in methods:
        m = get_method(name).configured((options or {}).get(name, {}))
        own = m.scheme or scheme
        mine = values.get(m.name) if isinstance(values, Mapping) else values
        swept = [None] if m.sweep is None else mine if mine is not None else [m.sweep.default]
        cuts = sorted((t for t in upload_thresholds if t == 1.0 or not m.upload_cut_problem(rounds)), reverse=True)
        for u in cuts:
            branches += [Branch(upload_label(m.label(v), u), m, v, scheme=own, upload_threshold=u) for v in swept]
    twice = [label for label, n in Counter(b.label for b in branches).items() if n > 1]
    if twice:
        raise ValueError(f"branch {twice[0]!r} is asked for twice (federation.methods or the swept values)")
    return branches


def upload_label(label: str, upload_threshold: float) -> str:
    """A branch's name with its upload threshold ("florist@0.90+up0.95"); at 1 (whole pairs) the plain name."""
    return label if upload_threshold == 1.0 else f"{label}+up{format_value(upload_threshold)}"


def sample_clients(num_clients: int, per_round: int, seed: int, round_number: int) -> list[int]:
    """The clients taking part in a round, drawn from the run's seed and the round number (all if per_round is 0)."""
    if per_round in (0, num_clients):
        return list(range(num_clients))
    return sorted(random.Random(seed_for(seed, "sampling", round_number)).sample(range(num_clients), per_round))


@dataclass
class RoundRecord:
    """One branch's outcome in one round (round 0: the base model). ``threshold``: the swept value, if any."""

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
    upload_threshold: float = 1.0  # the branch's clients' upload threshold
    upload_ranks: list[dict[str, int]] = field(default_factory=list)  # per participant, each module's kept rank

    def to_dict(self) -> dict:
        d = self.__dict__.copy()
        if self.upload_threshold == 1.0:  # whole pairs: the records of a run without cuts stay as they were
            del d["upload_threshold"], d["upload_ranks"]
        return d


@dataclass(frozen=True)
class RoundSettings:
    """Who trains, at which rank, how rounds follow each other."""

    ranks: Sequence[int]  # one per client
    alpha_per_rank: float
    scheme: str  # merge | reinit
    seed: int
    clients_per_round: int = 0  # 0: every client
    min_clients: int = 1
    report_kept: bool = True  # clients also send the factors they keep, for scoring personalised models only
    rounds: int = 1
    evaluate_every: int = 1  # score every k-th round, and always the last
    lr: float = 0.0  # the clients' learning rate: the size of a first-step start's step (Method.gradient_examples)

    def scores(self, round_number: int) -> bool:
        return round_number % self.evaluate_every == 0 or round_number >= self.rounds


@dataclass(frozen=True)
class UpdateChecks:
    """What every update is held to. ``module_shapes`` ({module: (out, in)}, the base model's adapted weights) is also
    what shared factors are drawn for; ``max_update_norm`` bounds each module's ``||s B A||_F`` (0: no bound);
    ``use_rslora`` says which PEFT scaling rule a job's alpha and rank give (None: either)."""

    module_shapes: Mapping[str, tuple[int, int]]
    max_update_norm: float = 0.0
    use_rslora: bool | None = None


@dataclass
class RoundHooks:
    """What the loop calls out to: scoring a branch's model (None: the base model) and persisting a round."""

    evaluate: Callable[[Branch | None], dict] = lambda branch: {}
    on_clients: Callable[[int, str, list[ClientResult]], None] = lambda *a: None
    on_round: Callable[[int, list[Branch], list[RoundRecord]], None] = lambda *a: None
    log: Callable[[str], None] = print


@dataclass
class Screened:
    """A group's replies after screening: the accepted results, {client: why} for each job left out, and how many
    jobs got a reply at all."""

    accepted: list[ClientResult]
    rejected: dict[str, str]
    replied: int


@dataclass
class Aggregated:
    """One branch's result of a round before it is kept: the result, the server's seconds, the accepted clients."""

    branch: Branch
    result: AggregationResult
    seconds: float
    group: str
    uploads: list[ClientUpdate] = field(default_factory=list)  # what the branch's clients count as sending


class Federation:
    """Runs the rounds: ``run_round`` plans, trains on the engine, screens, aggregates, scores and keeps.

    Per-client adapters (FlexLoRA's) are kept keyed by client index, whichever clients took part.
    """

    def __init__(
        self,
        engine: Engine,
        branches: list[Branch],
        settings: RoundSettings,
        checks: UpdateChecks,
        hooks: RoundHooks | None = None,
    ):
        self.engine, self.branches, self.settings, self.checks = engine, branches, settings, checks
        self.hooks = hooks or RoundHooks()
        self._shared: dict[tuple[int, ClientMode, int], Factors] = {}
        self._start_traffic: dict[tuple[str, int], dict[int, tuple[int, int]]] = {}  # see _first_step

    def run_round(self, round_number: int) -> list[RoundRecord]:
        """One round, start to end; ``RoundFailed`` (nothing kept, nothing written) if too few clients are usable."""
        self.prepare_shared(round_number)
        groups = self.plan_round(round_number)
        for g in groups:
            labels = ", ".join(b.label for b in g.branches)
            self.hooks.log(f"round {round_number}: training {len(g.jobs)} clients for {labels}")
        replies = self.engine.train(round_number, [job for g in groups for job in g.jobs])
        screened = {g.name: self.screen(round_number, g, replies.of_group(g.name)) for g in groups}
        return self.keep(round_number, groups, screened)

    # --- planning ------------------------------------------------------------------------------------------------

    def prepare_shared(self, round_number: int) -> None:
        """Estimate the shared factors of every branch whose method starts them from the first full-gradient step
        (``Method.gradient_examples``) and has not got them yet: in its draw's round, or after a resume."""
        for b in self.branches:
            mode, drawn = b.method.mode(round_number), b.method.shared_round(round_number)
            examples = b.method.gradient_examples(drawn)
            if not examples or not mode.shared:  # a core's start comes with the shared factors it sits between
                continue
            top = self._top_rank(b)
            if (drawn, mode, top) not in self._shared:
                self._shared[(drawn, mode, top)] = self._first_step(b, round_number, drawn, examples, top)

    def _first_step(self, branch: Branch, round_number: int, drawn: int, examples: int, rank: int) -> Factors:
        """The sampled clients' gradients of the base weights W0 over ``examples`` each, summed, turned into shared
        factors by the method. Each upload is held to the base model's modules and shapes and must be finite; the
        traffic (dense m × n gradients up, the factors down) is counted in the draw's round, not on a resume."""
        s, method = self.settings, branch.method
        group = f"{method.name} first step"
        sampled = sample_clients(len(s.ranks), s.clients_per_round, s.seed, drawn)  # a resumed run asks the same
        jobs = [
            ClientJob(
                k,
                ClientStart(1, s.alpha_per_rank, seed_for(s.seed, "client", 0, k), gradient_examples=examples),
                group=group,
            )
            for k in sampled
        ]
        self.hooks.log(f"round {round_number}: {len(jobs)} clients estimate the first gradient step for {method.name}")
        replies = self.engine.train(round_number, jobs)
        gradients, rejected = {}, {}
        for reply in replies.of_group(group).replies:
            if reply.client in gradients or reply.client not in sampled:
                continue
            sent = {name: held.get(GRADIENT) for name, held in reply.upload.factors.items()}
            problem = gradient_problem(sent, self.checks.module_shapes)
            if problem:
                rejected[reply.client] = problem
            else:
                gradients[reply.client] = reply.upload.factors
        for (_, client), why in replies.of_group(group).failures.items():
            rejected.setdefault(client, why)
        for client, why in sorted(rejected.items()):
            self.hooks.log(f"round {round_number} ({group}): left out client {client}: {why}")
        if len(gradients) < max(1, s.min_clients):
            raise RoundFailed(
                f"round {round_number}: {len(gradients)} of {len(jobs)} clients sent a usable gradient for "
                f"{method.name}'s first step, fewer than min_clients={s.min_clients}"
            )
        summed = {
            name: sum(g[name][GRADIENT].double() for g in gradients.values()) for name in self.checks.module_shapes
        }
        factors = method.shared_start(summed, rank, s.lr)
        if round_number == drawn:
            up = sum(m * n for m, n in self.checks.module_shapes.values())
            down = {k: sum(factor_size(held, self._rank(branch, k)) for held in factors.values()) for k in gradients}
            self._start_traffic[(method.name, round_number)] = {k: (up, down[k]) for k in gradients}
        return factors

    def plan_round(self, round_number: int) -> list[TrainingGroup]:
        """Sample this round's clients and group the branches that can share their training."""
        s = self.settings
        sampled = sample_clients(len(s.ranks), s.clients_per_round, s.seed, round_number)
        by_key: dict[tuple, list[Branch]] = {}
        for b in self.branches:
            by_key.setdefault(b.training_key(round_number, s.ranks), []).append(b)
        groups = []
        for key, branches in by_key.items():
            plain = key[0] == "fresh" and key[1] == BOTH_FACTORS and key[2] == tuple(s.ranks)
            name = key[1] if key[0] == "own" else "shared" if plain else branches[0].method.name
            top = self._top_rank(branches[0])
            jobs = [self._job(name, branches, k, round_number, top) for k in sampled]
            groups.append(TrainingGroup(name, branches, jobs))
        return groups

    def _job(self, group: str, branches: list[Branch], client: int, round_number: int, top: int) -> ClientJob:
        s, first = self.settings, branches[0]
        rank, mode = self._rank(first, client), first.method.mode(round_number)
        start = ClientStart(
            rank=rank,
            alpha=s.alpha_per_rank * rank,
            seed=seed_for(s.seed, "client", round_number, client),
            mode=mode,
            init=first.init_adapter(client),
            shared=self._shared_for(first.method, round_number, mode, top),
            keep_from=first.label if mode.keeps and first.history else None,
            keep_as=tuple(b.label for b in branches) if mode.keeps else (),
            report_kept=bool(mode.keeps) and s.report_kept,
            init_seed=seed_for(s.seed, "common init", round_number) if mode.common_init else None,
            # one upload serves every branch of the group: cut at the largest threshold, the lower ones recut from it
            upload_threshold=max(b.upload_threshold for b in branches),
        )
        return ClientJob(client, start, first.base_deltas(client), group=group)

    def _rank(self, branch: Branch, client: int) -> int:
        """The rank a client trains at in ``branch``: the run's for it, unless the method sets its own."""
        return branch.method.client_rank(self.settings.ranks[client], branch.history, client)

    def _top_rank(self, branch: Branch) -> int:
        """The largest rank any client trains at in ``branch``: what its shared factors are drawn at."""
        return max(self._rank(branch, k) for k in range(len(self.settings.ranks)))

    def _shared_for(self, method: Method, round_number: int, mode: ClientMode, rank: int) -> Factors | None:
        """What a job of this round is sent beside its base: the shared frozen factors, and a core's start only in
        the round it was estimated for (a later round's core starts at zero over the merged update)."""
        if not mode.shared:
            return None
        factors = self._shared_factors(method, round_number, mode, rank)
        if round_number == method.shared_round(round_number):
            return factors
        return {name: {f: t for f, t in held.items() if f != "R"} for name, held in factors.items()}

    def _shared_factors(self, method: Method, round_number: int, mode: ClientMode, rank: int) -> Factors:
        """A round's shared frozen factors, one draw at the group's largest rank (smaller ranks take the leading).

        ``Method.shared_round`` says which round's draw a round uses (the round itself, or 1 for one draw a run)."""
        drawn = method.shared_round(round_number)
        key = (drawn, mode, rank)
        if key not in self._shared:
            seed = seed_for(self.settings.seed, "shared", drawn)
            self._shared[key] = shared_factors(self.checks.module_shapes, mode, rank, seed)
        return self._shared[key]

    # --- screening -----------------------------------------------------------------------------------------------

    def screen(self, round_number: int, group: TrainingGroup, replies: RoundReplies) -> Screened:
        """This group's results that pass every check, and {client: reason} for each job left out.

        Each upload is completed from what its job was sent and held to what the job asked for: the base model's
        modules and shapes, at most the job's rank, and the scaling PEFT gives the job's alpha and rank.
        """
        start_of = {job.client: job.start for job in group.jobs}
        results, rejected, seen = [], {}, set()
        for reply in replies.replies:
            if reply.client not in start_of or reply.client in seen:
                continue  # the engine names replies by the job they answer: a stray one answers none of this group's
            try:
                results.append(self._completed(reply, start_of[reply.client]))
                seen.add(reply.client)
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
                rejected[reply.client] = f"its upload cannot be completed ({type(e).__name__}: {e})"
        starts = [start_of[r.client] for r in results]
        accepted, reasons = screen_updates(
            [r.update for r in results],
            self.checks.module_shapes,
            max_ranks=[s.rank for s in starts],
            scalings=[asked_scalings(s.alpha, s.rank, self.checks.use_rslora) for s in starts],
            max_norm=self.checks.max_update_norm,
        )
        for k, reason in reasons.items():
            rejected[results[k].client] = reason
        for k in accepted:
            reason = cut_problem(results[k], start_of[results[k].client])
            if reason:
                rejected[results[k].client] = reason
        accepted = [k for k in accepted if results[k].client not in rejected]
        answered = seen | set(rejected)
        for job in group.jobs:
            if job.client not in answered:
                why = replies.failures.get((group.name, job.client), "no update: the client failed or did not reply")
                rejected[job.client] = why
        for client, reason in sorted(rejected.items()):
            self.hooks.log(f"round {round_number} ({group.name}): left out client {client}: {reason}")
        replied = len({r.client for r in replies.replies} & set(start_of))
        return Screened([results[k] for k in accepted], {str(c): rejected[c] for c in sorted(rejected)}, replied)

    def _completed(self, reply: ClientReply, start: ClientStart) -> ClientResult:
        """The server's view of a reply: each module's pair from the upload and what the job was sent."""
        upload, shapes = reply.upload, self.checks.module_shapes
        modules = {
            name: completed_factors(start, name, sent, upload.scalings[name], shapes[name])
            for name, sent in upload.factors.items()
        }
        trained = start.rank if start.upload_threshold < 1.0 else 0  # a cut upload's pairs are below it
        update = ClientUpdate(modules, upload.num_examples, f"client {reply.client}", trained)
        return ClientResult(reply.client, update, reply.log, dict(upload.spectra))

    # --- aggregating and keeping ---------------------------------------------------------------------------------

    def keep(self, round_number: int, groups: Sequence[TrainingGroup], screened: Mapping[str, Screened]) -> list:
        """Aggregate every branch from its group's accepted updates, score each result, persist the round.

        Raises ``RoundFailed``, having kept and written nothing, when a group keeps fewer than ``min_clients``
        updates or its updates cannot be aggregated (which includes a result with a NaN or Inf in it): every
        branch's result is computed and checked before any is kept, scored or written.
        """
        for g in groups:
            self._check_enough(round_number, g, screened[g.name])
        try:
            aggregated = [a for g in groups for a in self.aggregate(round_number, g, screened[g.name].accepted)]
        except AggregationError as e:
            raise RoundFailed(f"round {round_number}: {e}") from None
        kept = {b.label: len(b.history) for b in self.branches}
        try:
            for a in aggregated:
                clients = [r.client for r in screened[a.group].accepted]
                params = part_params(a.branch.method, round_number, a.result)
                a.branch.history.append(a.result, clients, params)
            records = [self._record(round_number, a, screened[a.group]) for a in aggregated]
        except BaseException:
            for b in self.branches:  # the round never happened: no branch keeps a result of it
                b.history.truncate(kept[b.label])
            raise
        for g in groups:
            self.hooks.on_clients(round_number, g.name, screened[g.name].accepted)
        self.hooks.on_round(round_number, self.branches, records)
        for b in self.branches:  # the round is on disk: memory keeps what the next round needs
            b.history.settle()
        return records

    def _check_enough(self, round_number: int, group: TrainingGroup, screened: Screened) -> None:
        if len(screened.accepted) >= max(1, self.settings.min_clients):
            return
        why = "; ".join(f"client {c}: {reason}" for c, reason in screened.rejected.items())
        raise RoundFailed(
            f"round {round_number}: {screened.replied} of {len(group.jobs)} clients replied for {group.name} "
            f"and {len(screened.accepted)} updates passed the checks, fewer than "
            f"min_clients={self.settings.min_clients}" + (f" ({why})" if why else "")
        )

    def aggregate(self, round_number: int, group: TrainingGroup, results: list[ClientResult]) -> list[Aggregated]:
        """Every branch of the group aggregated from the same accepted updates, each result checked; nothing kept."""
        clients = [r.client for r in results]
        weights = normalized_weights([r.update for r in results], None)
        out = []
        for up in sorted({b.upload_threshold for b in group.branches}, reverse=True):
            updates = [cut_update(r, up) for r in results]  # screened already: here only cut, weighed and cast
            prepared = as_dtype(updates, compute_dtype(updates))
            mine = [b for b in group.branches if b.upload_threshold == up]
            out += self._aggregate_methods(round_number, group, mine, clients, prepared, weights, updates)
        order = {b.label: k for k, b in enumerate(group.branches)}
        return sorted(out, key=lambda a: order[a.branch.label])

    def _aggregate_methods(
        self,
        round_number: int,
        group: TrainingGroup,
        of_cut: list[Branch],
        clients: list[int],
        prepared: list[ClientUpdate],
        weights: list[float],
        updates: list[ClientUpdate],
    ) -> list[Aggregated]:
        """Each method of ``of_cut`` (the group's branches of one upload threshold) aggregated from the same prepared
        updates (``updates`` as their clients count as sending them)."""
        out = []
        for name in [m.name for m in in_order({b.method.name for b in of_cut})]:
            branches = [b for b in of_cut if b.method.name == name]
            method = branches[0].method  # configured with the run's options for it
            began = time.perf_counter()
            if method.uses_context:  # one branch: a method that reads its own past has no shared sweep
                context = RoundContext(round_number, [branches[0].init_adapter(c) for c in clients])
                swept = {b.value: method.aggregate(prepared, weights, b.value, context=context) for b in branches}
            else:
                swept = method.aggregate_sweep(prepared, weights, [b.value for b in branches])
            seconds = (time.perf_counter() - began) / len(branches)
            for b in branches:
                result = check_result(
                    swept[b.value], max_norm=self.checks.max_update_norm, clients=clients_named(clients)
                )
                result = by_client(result, clients, len(self.settings.ranks))
                out.append(Aggregated(b, result, seconds, group.name, updates))
        return out

    def _record(self, round_number: int, a: Aggregated, screened: Screened) -> RoundRecord:
        """The branch's record of the round; scoring its model now is the round's evaluation step."""
        accepted = screened.accepted
        clients = [r.client for r in accepted]
        uploads, up = a.uploads, a.branch.upload_threshold
        comm = round_communication(a.branch.method, round_number, uploads, in_reply_order(a.result, clients))
        if up < 1.0:  # a cut upload carries its spectrum beside the pair
            comm = with_spectra(comm, [sum(r.spectra[n].numel() for n in r.update.modules) for r in accepted])
        start = self._start_traffic.get((a.branch.method.name, round_number))
        if start:
            comm = with_start_traffic(comm, [start.get(c, (0, 0)) for c in clients])
        comm = with_catchup(comm, [a.branch.catchup_params(c, round_number) for c in clients])
        evaluation = {}
        if self.settings.scores(round_number):
            began = time.perf_counter()
            evaluation = self.hooks.evaluate(a.branch)
            took = time.perf_counter() - began
            self.hooks.log(f"round {round_number}: {a.branch.label} scored in {took:.0f} s{scores_line(evaluation)}")
        losses = [r.log.losses[-1] for r in accepted if r.log.losses]
        return RoundRecord(
            round=round_number,
            branch=a.branch.label,
            method=a.branch.method.name,
            threshold=a.branch.value,
            participants=clients,
            ranks=a.result.ranks,
            communication=comm.to_dict(),
            evaluation=evaluation,
            train={
                "final_loss_mean": sum(losses) / len(losses) if losses else None,
                "tokens": sum(r.log.tokens for r in accepted),
                "seconds": sum(r.log.seconds for r in accepted),
            },
            server_seconds=a.seconds,
            rejected=dict(screened.rejected),
            upload_threshold=up,
            upload_ranks=[{n: f.rank for n, f in u.modules.items()} for u in uploads] if up < 1.0 else [],
        )


def factor_size(held: Mapping[str, Tensor], rank: int) -> int:
    """Numbers in a module's shared factors (and core start) cut to ``rank``."""
    return sum(leading(f, t, rank).numel() for f, t in held.items())


def clients_named(clients: Sequence[int]) -> list[str]:
    return [f"client {c}" for c in clients]


def scores_line(evaluation: dict) -> str:
    """ ": accuracy 41.20%, held-out loss 2.3456", or "" when nothing was scored."""
    parts = []
    if evaluation.get("accuracy") is not None:
        parts.append(f"accuracy {100 * evaluation['accuracy']:.2f}%")
    if evaluation.get("heldout_loss") is not None:
        parts.append(f"held-out loss {evaluation['heldout_loss']:.4f}")
    return ": " + ", ".join(parts) if parts else ""


def by_client(result: AggregationResult, clients: list[int], num_clients: int) -> AggregationResult:
    """Per-client adapters re-keyed from this round's reply order to client indices (non-participants: the global)."""
    if result.per_client is None:
        return result
    per_client = [result.modules] * num_clients
    for position, client in enumerate(clients):
        per_client[client] = result.per_client[position]
    return dataclasses.replace(result, per_client=per_client)


def in_reply_order(result: AggregationResult, clients: list[int]) -> AggregationResult:
    """The inverse of ``by_client``: per-client adapters in reply order, for accounting over the participants."""
    if result.per_client is None:
        return result
    return dataclasses.replace(result, per_client=[result.per_client[c] for c in clients])


def cut_problem(result: ClientResult, start: ClientStart) -> str:
    """Why a reply to a job that asked for cut uploads is not such a cut (``truncation_problem``), or ""."""
    if start.upload_threshold >= 1.0:
        return "its upload carries spectra its job did not ask for" if result.spectra else ""
    for name, pair in result.update.modules.items():
        problem = truncation_problem(pair, result.spectra.get(name), start.upload_threshold, start.rank)
        if problem:
            return f"its upload of module {name} is not the cut its job asked for: {problem}"
    return ""


def cut_update(result: ClientResult, threshold: float) -> ClientUpdate:
    """A client's update as a branch of upload threshold ``threshold`` counts it: an upload the client cut (its pairs
    below the rank it trained at, ``trained_rank``) recut at it, by its leading components; a whole pair cut at it as
    the client would have (its spectrum kept for the client's record); a whole pair at 1 as it is."""
    update = result.update
    if threshold >= 1.0:
        return update
    cut_by_client = update.trained_rank > 0
    modules = {}
    for name, pair in update.modules.items():
        if cut_by_client:
            modules[name] = recut(pair, result.spectra[name], threshold)
        else:  # a whole pair's factors are no cut: its leading components are not its best approximation
            modules[name], spectrum = truncated_pair(pair, threshold)
            result.spectra.setdefault(name, spectrum)
    trained = update.trained_rank or max(f.rank for f in update.modules.values())
    return ClientUpdate(modules, update.num_examples, update.client_id, trained)
