"""florist on Flower: the engine behind ``--engine flower`` and florist's ServerApp, over Flower's Message API.

The loop is florist's (``Federation.run_round``, the same for every engine); Flower carries it:

- ``NodeDirectory`` asks every SuperNode which client it is (its ``partition-id``) and how many examples it holds;
- ``FlowerEngine.train`` turns a round's ``ClientJob``s into one message per client, sends them all with
  ``Grid.send_and_receive`` and reads every reply into a ``ClientReply``, saying for every job without one why;
- ``serve_run`` is the body of every florist ServerApp: the same code under the simulation engine and in a
  deployment (``florist.engines.flower_app``).

Every round also appends to ``flower_traffic.jsonl`` in the run directory: per client, what went down and came
up, counted from the arrays in the messages, and whether (and why not) the client replied.

To use a florist aggregation rule inside a Flower app of your own, see ``florist.engines.flower_strategy``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..config import RunConfig
from ..jobs import ClientJob, ClientReply, RoundReplies
from ..reading import leading_records
from ..rundir import RunDirectory, atomic_write_text
from ..server import RoundFailed
from ..setup import build_federation, load_server_model
from .flower_messages import (
    DESCRIBE,
    JOB,
    MAX_EXAMPLES,
    NOT_HELD,
    TRAIN,
    MessageError,
    check_echo,
    downlink_bytes,
    error_reason,
    job_content,
    read_description,
    read_update,
    uplink_bytes,
)

TRAFFIC_FILE = "flower_traffic.jsonl"

# Two cores are enough: one CPU per virtual SuperNode, as many SuperNodes at once as there are cores.
SIMULATION_BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}

NO_REPLY = "no reply within the round's timeout"
NO_NODE = "no SuperNode online for this client"
NOT_SENT = "not sent: its SuperNode failed an earlier job of this round"


def answers(messages: Sequence[Message], replies: Iterable[Message]) -> dict[int, Message]:
    """The first reply to each message, by the message's position; a second reply to one, or a reply to none of them,
    answers nothing. Flower's grids give each message its id as they push it (``Grid.push_messages``)."""
    position = {m.metadata.message_id: k for k, m in enumerate(messages) if m.metadata.message_id}
    first: dict[int, Message] = {}
    for reply in replies:
        k = position.get(reply.metadata.reply_to_message_id)
        if k is not None and k not in first:
            first[k] = reply
    return first


def waves(messages: Sequence[Message]) -> list[list[int]]:
    """The positions of the messages in waves of at most one per node, in order: a node's k-th message is in wave k."""
    out: list[list[int]] = []
    count: dict[int, int] = {}
    for position, m in enumerate(messages):
        k = count.get(m.metadata.dst_node_id, 0)
        count[m.metadata.dst_node_id] = k + 1
        if k == len(out):
            out.append([])
        out[k].append(position)
    return out


def lost_state(reply: Message) -> bool:
    """An error reply saying the node lost base updates it was sent (``NOT_HELD``), however long the text around it:
    the node is alive, and is sent its whole base."""
    return reply.has_error() and NOT_HELD in str(reply.error.reason)


def check_sender(reply: Message, sent: Message) -> None:
    """Refuse an error reply (with its reason) and one from another SuperNode than the message went to."""
    if reply.has_error():  # first: Flower itself answers for a node that went away, from another node id
        if lost_state(reply):
            raise MessageError(f"the SuperNode {NOT_HELD} it was sent: {error_reason(reply)}")
        raise MessageError(error_reason(reply))
    sender, node = reply.metadata.src_node_id, sent.metadata.dst_node_id
    if sender != node:
        raise MessageError(f"the reply came from SuperNode {sender}, not from SuperNode {node}")


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
        max_examples: int = MAX_EXAMPLES,
    ):
        self.grid, self.config_toml, self.num_clients = grid, config_toml, num_clients
        self.log, self.max_examples = log, max_examples
        self.node_of: dict[int, int] = {}  # client -> node id
        self.sizes = [0] * num_clients  # examples per client, as its first node reported them
        self._described: set[int] = set()  # clients whose size is known
        self._refused: set[int] = set()

    def refresh(self, timeout: float | None = None) -> None:
        """Forget the nodes that went offline and ask the new ones, waiting ``timeout`` s at most (None: no limit)."""
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
        replies = list(self.grid.send_and_receive(query, timeout=timeout))
        position = {m.metadata.message_id: k for k, m in enumerate(query) if m.metadata.message_id}
        answered: set[int] = set()
        for reply in replies:
            k = position.get(reply.metadata.reply_to_message_id)
            if k is None or k in answered:  # a second reply to one question, or an answer to none asked
                self.log(f"SuperNode {reply.metadata.src_node_id}: a reply to no open question is ignored")
                continue
            answered.add(k)
            node = new[k]
            try:
                client, size = self._description(reply, query[k])
            except MessageError as e:
                self.log(f"SuperNode {node} is refused: {e}")
                self._refused.add(node)
                continue
            self.node_of[client], self.sizes[client] = node, size
            self._described.add(client)
            self.log(f"client {client}: SuperNode {node}, {size} examples")

    def _description(self, reply: Message, question: Message) -> tuple[int, int]:
        """The client a node is and its example count, from its reply; ``MessageError`` if the run cannot use it."""
        check_sender(reply, question)
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


# --- the engine ------------------------------------------------------------------------------------------------------


class FlowerEngine:
    """An ``Engine`` (``florist.server``) whose clients are Flower SuperNodes reached through a ``Grid``.

    ``train`` first refreshes the node directory (new SuperNodes are asked which client they are, waiting up to
    ``node_wait`` seconds; offline ones are forgotten), then sends one message per job (``job_content``: the
    client's start, mode, init adapter, shared factors and the base updates its node does not hold yet: ``held``) with
    ``Grid.send_and_receive`` and waits ``round_timeout`` seconds for the replies (None: until every message is
    answered, which Flower does with an error for a SuperNode that stopped sending heartbeats). A node that answers
    that it lost base updates it was sent (``NOT_HELD``: a restarted ClientApp) is sent the whole base at once, in
    the same round; a restarted SuperNode has a new node id, whose ledger is empty. Each reply is read as untrusted:
    an error reply, one from another node than the job went to, one whose echo of round, group and client is not the
    job's, one over ``max_update_bytes`` or claiming another example count than its node described, and every
    malformed one (``read_update``) is refused with its reason.
    """

    def __init__(
        self,
        grid: Grid,
        nodes: NodeDirectory,
        config_toml: str,
        *,
        round_timeout: float | None = None,
        node_wait: float | None = None,
        max_update_bytes: int = 0,
        traffic: TrafficLog | None = None,
        log: Callable[[str], None] = print,
    ):
        self.grid, self.nodes, self.config_toml = grid, nodes, config_toml
        self.round_timeout, self.node_wait, self.max_update_bytes = round_timeout, node_wait, max_update_bytes
        self.traffic, self.log = traffic, log
        self.held: dict[int, set[str]] = {}  # node id -> the keys of the base updates it was sent and kept

    def train(self, round_number: int, jobs: Sequence[ClientJob]) -> RoundReplies:
        """Every job of the round under one timeout, the round's: one ``send_and_receive`` per wave of at most one
        message a node (a client with jobs in several training groups gets a message for each, one after another)."""
        self.nodes.refresh(timeout=self.node_wait)
        # per job, its line in the traffic record: the node it went to, what became of it, the bytes each way
        seen = {
            (job.group, job.client): {"client": job.client, "node": None, "status": NO_NODE, "down": None, "up": None}
            for job in jobs
        }
        began = time.monotonic()
        got = self._exchange(round_number, jobs, seen)
        lost = [j for j in jobs if (j.group, j.client) not in got and NOT_HELD in seen[(j.group, j.client)]["status"]]
        if lost:  # nodes that lost their state (a restarted ClientApp) get the whole base, once
            self.log(f"round {round_number}: {len(lost)} clients lost their base updates; sending them all")
            got |= self._exchange(round_number, lost, seen)
        took = time.monotonic() - began
        self.log(f"round {round_number}: {len(got)} of {len(jobs)} jobs answered in {took:.0f} s")
        failures = {key: line["status"] for key, line in seen.items() if key not in got}
        for (group, client), reason in failures.items():
            self.log(f"round {round_number}: client {client} ({group}): {reason}")
        if self.traffic is not None:
            groups = list(dict.fromkeys(job.group for job in jobs))
            self.traffic.append(
                [
                    {"round": round_number, "group": g, "clients": [seen[(g, j.client)] for j in jobs if j.group == g]}
                    for g in groups
                ]
            )
        return RoundReplies([got[key] for key in seen if key in got], failures)

    def _exchange(
        self, round_number: int, jobs: Sequence[ClientJob], seen: dict[tuple[str, int], dict]
    ) -> dict[tuple[str, int], ClientReply]:
        """A message to every job's node, and the replies that pass every check, by (group, client); ``seen`` is
        updated."""
        sending, messages = [], []
        for job in jobs:
            node = self.nodes.node_of.get(job.client)
            if node is None:
                continue
            content = job_content(job, round_number, self.config_toml, self.held.get(node, set()))
            messages.append(Message(content, dst_node_id=node, message_type=TRAIN, group_id=str(round_number)))
            sending.append(job)
            line = seen[(job.group, job.client)]
            down = downlink_bytes(content)
            if line["down"]:  # a second message for the job (its node had lost its base): both count
                down = {what: n + line["down"].get(what, 0) for what, n in down.items()}
            line.update(node=node, status=NO_REPLY, down=down)
        replies, skipped = self._send(messages)
        for k in skipped:
            seen[(sending[k].group, sending[k].client)]["status"] = NOT_SENT
        got: dict[tuple[str, int], ClientReply] = {}
        for k, reply in answers(messages, replies).items():
            job = sending[k]
            key = (job.group, job.client)
            node = messages[k].metadata.dst_node_id
            try:
                got[key] = self._read(round_number, job, reply, messages[k])
            except MessageError as e:
                seen[key]["status"] = f"error: {e}"
                if NOT_HELD in str(e):
                    self.held.pop(node, None)
                continue
            self.held.setdefault(node, set()).update(d.key for d in job.base_deltas)
            seen[key].update(status="replied", up=uplink_bytes(reply.content))
        return got

    def _send(self, messages: Sequence[Message]) -> tuple[list[Message], set[int]]:
        """Every message, and the replies within the round's timeout; and the positions of the messages not sent. A node
        gets its messages one after another (a wave holds one message per node): each call of its ClientApp starts
        from the node's state as the last one left it, where two at once would each start from the same state and
        the later reply's would overwrite the other's (what Flower's simulation does with a node's context), losing
        the base updates it was sent. A node that did not answer a wave, or answered with an error (a node that went
        away: Flower's own error reply), is sent nothing more this round, so that it costs the round one wait."""
        deadline = None if self.round_timeout is None else time.monotonic() + self.round_timeout
        replies: list[Message] = []
        failed: set[int] = set()  # nodes
        skipped: set[int] = set()  # positions
        for wave in waves(messages):
            skipped |= {k for k in wave if messages[k].metadata.dst_node_id in failed}
            sending = [messages[k] for k in wave if k not in skipped]
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:  # the round is over: the rest stay unanswered
                break
            got = list(self.grid.send_and_receive(sending, timeout=timeout)) if sending else []
            replies += got
            first = answers(sending, got)
            for k, m in enumerate(sending):
                if k not in first or (first[k].has_error() and not lost_state(first[k])):
                    failed.add(m.metadata.dst_node_id)
        return replies, skipped

    def _read(self, round_number: int, job: ClientJob, reply: Message, sent: Message) -> ClientReply:
        check_sender(reply, sent)
        check_echo(reply.content, round_number, job.group, job.client)
        return read_update(reply.content, job, self.max_update_bytes, self.nodes.sizes[job.client])


# --- the rounds ------------------------------------------------------------------------------------------------------


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
    """A florist ServerApp's work on ``grid`` for an opened run directory: rounds ``done + 1`` ..
    ``config.federation.rounds``, each written to the run directory, and the traffic record.

    The loop is built once the SuperNodes have said how much data they hold. ``load_model`` replaces
    ``florist.models.load_model`` for the server's copy of the model (same call).
    """
    server = load_server_model(config, log, load_model)
    config_toml = config.to_toml()
    max_examples = config.data.max_examples_per_client or MAX_EXAMPLES
    nodes = NodeDirectory(grid, config_toml, config.data.clients, log, max_examples=max_examples)
    nodes.wait(config.federation.min_clients, node_wait)
    log("client sizes: " + ", ".join(str(n) for n in nodes.sizes))
    engine = FlowerEngine(
        grid,
        nodes,
        config_toml,
        round_timeout=round_timeout,
        node_wait=node_wait,
        max_update_bytes=config.federation.max_update_bytes,
        traffic=TrafficLog(rundir.path / TRAFFIC_FILE, done),
        log=log,
    )
    federation = build_federation(config, server, rundir, done, nodes.sizes, engine, log, progress=progress)
    for round_number in range(done + 1, config.federation.rounds + 1):
        federation.run_round(round_number)
        log(f"round {round_number} finished and saved")
