"""florist on Flower: the server side of the Message API, and the simulation engine behind ``--engine flower``.

The loop stays florist's (``Federation.plan_round`` / ``finish_round``); Flower carries it:

- ``NodeDirectory`` asks every SuperNode which client it is (its ``partition-id``) and how many examples it holds;
- ``FloristStrategy.configure_train`` turns each training group's ``ClientJob``s into one message per client,
  ``aggregate_train`` turns the replies back into ``ClientResult``s and calls ``Federation.finish_round``, which
  aggregates with ``florist.aggregation``, scores every branch and writes the round to the run directory;
- ``serve`` drives the rounds on a ``Grid``: the same code under the simulation engine and in a deployment.

Every round also appends to ``flower_traffic.jsonl`` in the run directory: per client, what went down and came
up, counted from the arrays in the messages, and whether (and why not) the client replied.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from .. import run as run_module
from ..config import RunConfig
from ..models import load_model
from ..progress import Steps
from ..reading import leading_records
from ..rundir import RunDirectory, atomic_write_text
from ..server import ClientResult, Federation, RoundFailed, TrainingGroup
from .flower_messages import (
    DESCRIBE,
    JOB,
    MAX_EXAMPLES,
    TRAIN,
    MessageError,
    downlink_bytes,
    job_content,
    read_description,
    read_echo,
    read_update,
    uplink_bytes,
)

TRAFFIC_FILE = "flower_traffic.jsonl"

# Two cores are enough: one CPU per virtual SuperNode, as many SuperNodes at once as there are cores.
SIMULATION_BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}

POLL_SECONDS = 0.5
MAX_REASON = 300  # characters of a SuperNode's error text kept in the log and the traffic record


# --- sending and receiving -------------------------------------------------------------------------------------------


def exchange(
    grid: Grid, messages: Sequence[Message], timeout: float | None, what: str, progress: bool
) -> list[Message]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` seconds passed (None: no limit).

    Flower answers a message whose SuperNode went offline with an error reply, so a dead node ends the wait too.
    """
    ids = {i for i in grid.push_messages(messages) if i}
    replies: list[Message] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    with Steps(progress) as steps:  # a bar on a terminal; elsewhere one line once the wait is over
        step = steps.add(what, total=len(messages), unit="replies")
        while ids and (deadline is None or time.monotonic() < deadline):
            arrived = list(grid.pull_messages(ids))
            replies += arrived
            ids -= {m.metadata.reply_to_message_id for m in arrived}
            step.update(completed=len(replies))
            if ids:
                time.sleep(POLL_SECONDS)
        step.done()
    return replies


def error_reason(reply: Message) -> str:
    """An error reply's reason, on one line and cut short: it is the SuperNode's text."""
    reason = " ".join(str(reply.error.reason).split()) or f"error code {reply.error.code}"
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


# --- which SuperNode is which client ---------------------------------------------------------------------------------


class NodeDirectory:
    """Maps clients to the SuperNodes that hold their data, from each node's answer to a ``query.describe``.

    A SuperNode knows its client index from its node config (``partition-id``); the server never reads client data.
    Nodes that go offline are forgotten; new ones (a restarted SuperNode) are asked when they appear. A node whose
    answer is not a description the run can use (an error, a malformed or out-of-range field, a second node for one
    client, another count of examples than its client's first node gave) is refused, with a log line naming it and
    what is wrong, and not asked again: it can neither take another client's place nor change a client's size.
    """

    def __init__(
        self,
        grid: Grid,
        config_toml: str,
        num_clients: int,
        log: Callable[[str], None],
        progress: bool = False,
        max_examples: int = MAX_EXAMPLES,
    ):
        self.grid, self.config_toml, self.num_clients = grid, config_toml, num_clients
        self.log, self.progress, self.max_examples = log, progress, max_examples
        self.node_of: dict[int, int] = {}  # client -> node id
        self.sizes = [0] * num_clients  # examples per client, as its first node reported them
        self._described: set[int] = set()  # clients whose size is known
        self._refused: set[int] = set()

    def refresh(self, timeout: float | None = None) -> None:
        online = set(self.grid.get_node_ids())
        for client, node in list(self.node_of.items()):
            if node not in online:
                self.log(f"client {client}: SuperNode {node} is offline")
                del self.node_of[client]
        new = sorted(online - set(self.node_of.values()) - self._refused)
        if not new:
            return
        query = [
            Message(RecordDict({JOB: ConfigRecord({"config": self.config_toml})}), dst_node_id=n, message_type=DESCRIBE)
            for n in new
        ]
        replies = exchange(self.grid, query, timeout, "asking SuperNodes which client they are", self.progress)
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in query if m.metadata.message_id}
        for reply in replies:
            node = asked.pop(reply.metadata.reply_to_message_id, None)
            if node is None:  # a second reply to one question, or an answer to none asked
                self.log(f"SuperNode {reply.metadata.src_node_id}: a reply to no open question is ignored")
                continue
            try:
                client, size = self._description(reply, node)
            except MessageError as e:
                self.log(f"SuperNode {node} is refused: {e}")
                self._refused.add(node)
                continue
            self.node_of[client], self.sizes[client] = node, size
            self._described.add(client)
            self.log(f"client {client}: SuperNode {node}, {size} examples")

    def _description(self, reply: Message, node: int) -> tuple[int, int]:
        """The client ``node`` is and its example count, from its reply; ``MessageError`` if the run cannot use it."""
        if reply.has_error():  # first: Flower itself answers for a node that went away, from another node id
            raise MessageError(error_reason(reply))
        if reply.metadata.src_node_id != node:
            raise MessageError(f"the reply to its question came from SuperNode {reply.metadata.src_node_id}")
        client, size = read_description(reply.content, "its description", self.num_clients, self.max_examples)
        if client in self.node_of:  # two online nodes for one client: the first keeps it
            raise MessageError(f"client {client} is SuperNode {self.node_of[client]}")
        if client in self._described and size != self.sizes[client]:
            first = self.sizes[client]
            raise MessageError(f"it says client {client} holds {size} examples; its first SuperNode said {first}")
        return client, size

    def wait(self, min_clients: int, timeout: float) -> None:
        """Until every client's SuperNode answered, or ``timeout`` s passed with at least ``min_clients`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh(timeout=max(1.0, deadline - time.monotonic()))
            if len(self.node_of) == self.num_clients or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        missing = [k for k in range(self.num_clients) if k not in self.node_of]
        if len(self.node_of) < max(1, min_clients):
            raise RoundFailed(
                f"{len(self.node_of)} of {self.num_clients} clients' SuperNodes answered within {timeout:.0f} s, "
                f"fewer than federation.min_clients={min_clients} (missing clients: {missing})"
            )
        if missing:
            self.log(f"going on without clients {missing}: no SuperNode answered for them")


# --- the traffic record ----------------------------------------------------------------------------------------------


class TrafficLog:
    """``flower_traffic.jsonl``: one line per round and training group. Lines of unfinished rounds are dropped."""

    def __init__(self, path: Path, done: int):
        self.path = path
        kept = [x for x in self.lines() if x["round"] <= done]
        if kept != self.lines():
            self._write(kept)

    def lines(self) -> list[dict]:
        """The records before the first line a crash cut short (or that is no record): the traffic of whole rounds."""
        if not self.path.exists():
            return []
        records, _ = leading_records(self.path.read_bytes(), _is_traffic_record)
        return records

    def append(self, lines: Iterable[dict]) -> None:
        self._write(self.lines() + list(lines))

    def _write(self, lines: list[dict]) -> None:
        atomic_write_text(self.path, "".join(json.dumps(x) + "\n" for x in lines))


def _is_traffic_record(line) -> bool:
    return isinstance(line, dict) and isinstance(line.get("round"), int)


# --- the strategy ----------------------------------------------------------------------------------------------------


NO_REPLY = "no reply within the round's timeout"
NO_NODE = "no SuperNode online for this client"


@dataclass
class _Sent:
    """One training message and what became of it."""

    group: str
    index: int  # the job's position in its group
    message: Message
    down: dict
    status: str = NO_REPLY
    up: dict | None = None


@dataclass
class _Plan:
    round: int
    groups: list[TrainingGroup]
    sent: list[_Sent] = field(default_factory=list)


class FloristStrategy(Strategy):
    """Flower's strategy interface over florist's loop: per-client payloads out, florist aggregation in.

    ``configure_train`` plans the round (``Federation.plan_round``) and builds one message per client and training
    group, each carrying that client's own start (rank, init adapter, frozen A) and merged base updates.
    ``aggregate_train`` reads the replies in job order and hands them to ``Federation.finish_round``: below
    ``federation.min_clients`` replies per group it raises ``RoundFailed`` and the round leaves nothing behind.
    Evaluation is the server's (``finish_round`` scores every branch), so ``configure_evaluate`` sends nothing.
    """

    def __init__(
        self,
        federation: Federation,
        nodes: NodeDirectory,
        config_toml: str,
        traffic: TrafficLog | None = None,
        log: Callable[[str], None] = print,
        max_update_bytes: int = 0,
    ):
        self.federation, self.nodes, self.config_toml = federation, nodes, config_toml
        self.traffic, self.log, self.max_update_bytes = traffic, log, max_update_bytes
        self._plan: _Plan | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        plan = _Plan(server_round, self.federation.plan_round(server_round))
        for g in plan.groups:
            sends_a = g.branches[0].method.sends_a
            self.log(
                f"round {server_round}: training {len(g.jobs)} clients for {', '.join(b.label for b in g.branches)}"
            )
            for index, job in enumerate(g.jobs):
                node = self.nodes.node_of.get(job.client)
                if node is None:
                    self.log(f"round {server_round}: client {job.client} ({g.name}): {NO_NODE}")
                    continue
                content = job_content(job, server_round, g.name, sends_a, self.config_toml)
                message = Message(content, dst_node_id=node, message_type=TRAIN, group_id=str(server_round))
                plan.sent.append(_Sent(g.name, index, message, downlink_bytes(content)))
        self._plan = plan
        return [s.message for s in plan.sent]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        plan = self._plan
        if plan is None or plan.round != server_round:
            raise RuntimeError(f"round {server_round}: aggregate_train without configure_train")
        by_id = {s.message.metadata.message_id: s for s in plan.sent}
        jobs = {g.name: g.jobs for g in plan.groups}
        results: dict[str, list[tuple[int, ClientResult]]] = {g.name: [] for g in plan.groups}
        for reply in replies:
            sent = by_id.pop(reply.metadata.reply_to_message_id, None)
            if sent is None:
                continue  # not a reply to this round's messages, or a second reply to one
            job = jobs[sent.group][sent.index]
            try:
                if reply.has_error():  # first: Flower itself answers for a node that went away, from another id
                    raise MessageError(error_reason(reply))
                if reply.metadata.src_node_id != sent.message.metadata.dst_node_id:
                    raise MessageError(
                        f"the reply came from SuperNode {reply.metadata.src_node_id}, "
                        f"not from SuperNode {sent.message.metadata.dst_node_id}"
                    )
                _check_echo(reply.content, server_round, sent.group, job.client)
                result = read_update(reply.content, job, self.max_update_bytes, self.nodes.sizes[job.client])
            except MessageError as e:
                sent.status = f"error: {e}"
                continue
            results[sent.group].append((sent.index, result))
            sent.status, sent.up = "replied", uplink_bytes(reply.content)
        for s in plan.sent:
            if s.status != "replied":
                self.log(f"round {server_round}: client {jobs[s.group][s.index].client} ({s.group}): {s.status}")
        if self.traffic is not None:
            self.traffic.append(self._traffic_lines(plan))
        ordered = {name: [r for _, r in sorted(pairs, key=lambda p: p[0])] for name, pairs in results.items()}
        failures = {g.name: {} for g in plan.groups}
        for s in plan.sent:
            if s.status != "replied":
                failures[s.group][jobs[s.group][s.index].client] = s.status
        self.federation.finish_round(server_round, plan.groups, ordered, failures)
        self._plan = None
        return None, MetricRecord({"messages-sent": len(plan.sent), "replies": sum(len(v) for v in ordered.values())})

    @staticmethod
    def _traffic_lines(plan: _Plan) -> list[dict]:
        lines = []
        for g in plan.groups:
            sent = {s.index: s for s in plan.sent if s.group == g.name}
            clients = []
            for index, job in enumerate(g.jobs):
                s = sent.get(index)
                clients.append(
                    {
                        "client": job.client,
                        "node": s.message.metadata.dst_node_id if s else None,
                        "status": s.status if s else NO_NODE,
                        "down": s.down if s else None,
                        "up": s.up if s else None,
                    }
                )
            lines.append(
                {"round": plan.round, "group": g.name, "branches": [b.label for b in g.branches], "clients": clients}
            )
        return lines

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        return []  # the server scores every branch itself, in Federation.finish_round

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        self.log(
            f"florist strategy: {', '.join(b.label for b in self.federation.branches)}; "
            f"{len(self.nodes.node_of)} SuperNodes"
        )


def _check_echo(content: RecordDict, round_number: int, group: str, client: int) -> None:
    """Refuse a reply whose echo of the job (round, training group, client) is not the job's."""
    echo = read_echo(content)
    if echo != (round_number, group, client):
        raise MessageError(
            f"reply for round {echo[0]} group {echo[1]!r:.60} client {echo[2]} answers the job for "
            f"round {round_number} group {group!r} client {client}"
        )


# --- the rounds ------------------------------------------------------------------------------------------------------


def serve(
    grid: Grid,
    config: RunConfig,
    done: int,
    start_federation: Callable[[list[int]], Federation],
    *,
    traffic: TrafficLog | None,
    round_timeout: float | None,
    node_wait: float,
    progress: bool,
    log: Callable[[str], None],
) -> None:
    """Rounds ``done + 1`` .. ``config.federation.rounds`` on ``grid``: the body of every florist ServerApp.

    ``start_federation(client_sizes)`` builds the loop once the SuperNodes have said how much data they hold.
    """
    config_toml = config.to_toml()
    nodes = NodeDirectory(
        grid,
        config_toml,
        config.data.clients,
        log,
        progress,
        max_examples=config.data.max_examples_per_client or MAX_EXAMPLES,
    )
    nodes.wait(config.federation.min_clients, node_wait)
    log("client sizes: " + ", ".join(str(n) for n in nodes.sizes))
    strategy = FloristStrategy(
        start_federation(nodes.sizes),
        nodes,
        config_toml,
        traffic,
        log,
        max_update_bytes=config.federation.max_update_bytes,
    )
    strategy.summary()
    for round_number in range(done + 1, config.federation.rounds + 1):
        nodes.refresh(timeout=node_wait)
        messages = strategy.configure_train(round_number, ArrayRecord(), ConfigRecord(), grid)
        replies = exchange(grid, messages, round_timeout, f"round {round_number}: client updates", progress)
        strategy.aggregate_train(round_number, replies)
        log(f"round {round_number} finished and saved")


def serve_run(
    grid: Grid,
    config: RunConfig,
    rundir: RunDirectory,
    done: int,
    *,
    round_timeout: float | None = None,
    node_wait: float = 600.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    load_model: Callable | None = None,
) -> None:
    """A florist ServerApp's work on ``grid`` for an opened run directory: the server's model, the rounds, the traffic.

    ``load_model`` replaces ``florist.models.load_model`` for the server's copy of the model (same call).
    """
    server = run_module.load_server_model(config, log, load_model)

    def start_federation(sizes: list[int]) -> Federation:
        return run_module.build_federation(config, server, rundir, done, sizes, None, log, progress=progress)

    serve(
        grid,
        config,
        done,
        start_federation,
        traffic=TrafficLog(rundir.path / TRAFFIC_FILE, done),
        round_timeout=round_timeout,
        node_wait=node_wait,
        progress=progress,
        log=log,
    )


def run_simulation(
    config: RunConfig,
    rundir: RunDirectory,
    done: int,
    progress: bool = True,
    log: Callable[[str], None] = print,
    backend_config: dict | None = None,
) -> None:
    """The rounds on Flower's simulation engine: one virtual SuperNode per client, each loading its own partition.

    The server loads the base model to score the branches; each ClientApp loads the model (with
    ``florist.models.load_model``, as this module names it when called) and its own client's data only.
    """
    from flwr.simulation import run_simulation as flower_run_simulation

    from .flower_app import client_app

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        serve_run(
            grid,
            config,
            rundir,
            done,
            round_timeout=config.federation.client_timeout or None,
            progress=progress,
            log=log,
        )

    log(f"starting Flower's simulation engine: {config.data.clients} SuperNodes")
    flower_run_simulation(
        app,
        client_app(load_model),
        num_supernodes=config.data.clients,
        backend_config=copy.deepcopy(backend_config or SIMULATION_BACKEND),
    )
