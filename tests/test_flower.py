"""florist on Flower: the records, the strategy over a Grid, and the simulation engine against the in-process one.

Most tests drive the real ServerApp and ClientApp through a Grid that calls the ClientApps in this process (with
every record serialised and parsed back as on the wire); one runs ``florist run --engine flower`` on Flower's
simulation engine (Ray, one SuperNode per client).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st
from test_federation import TINY_RUN
from typer.testing import CliRunner

import florist.engines.flower as flower
import florist.run as run_module
from florist.adapters import read_adapter
from florist.aggregation import ClientUpdate, LoraFactors, ModuleAggregate, get_method, prepare
from florist.client import ClientStart, TrainingLog
from florist.communication import round_communication
from florist.config import ConfigError, load_config
from florist.engines.flower_app import MAX_CONFIG, DeploymentSettings, node_client
from florist.engines.flower_messages import (
    MAX_STEPS,
    MessageError,
    downlink_bytes,
    job_config,
    job_content,
    read_job,
    read_update,
    str_field,
    update_content,
    uplink_bytes,
)
from florist.models import tiny_llama
from florist.server import ClientJob, RoundFailed, TrainingGroup, make_branches
from florist.synthetic import frozen_a_updates, synthetic_updates

FAST = [*TINY_RUN, "eval.limit=8", "lora.ranks=[4,2,2]"]
ALL_METHODS = 'federation.methods=["florist","fedit","flexlora","ffa","flora"]'


def tiny(name, dtype, device):
    return tiny_llama(0)


def over_the_wire(content: RecordDict) -> RecordDict:
    """Serialise a record dict as Flower does for transport and parse it back."""
    objects = get_all_nested_objects(content)
    return inflate_object_from_contents(content.object_id, {i: o.deflate() for i, o in objects.items()})


@pytest.fixture
def one_thread():
    """Ray gives each simulated SuperNode one thread; the in-process run it is compared with gets the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_models(monkeypatch):
    monkeypatch.setattr(run_module, "load_model", tiny)  # the server's copy
    monkeypatch.setattr(flower, "load_model", tiny)  # the ClientApps'


# --- records ---------------------------------------------------------------------------------------------------------


def _adapter(g, shapes, rank):
    return {
        n: ModuleAggregate(A=torch.randn(rank, i, generator=g), B=torch.randn(o, rank, generator=g))
        for n, (o, i) in shapes.items()
    }


@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(1, 6),
    init=st.booleans(),
    frozen=st.booleans(),
    merged=st.integers(0, 3),
    seed=st.integers(0, 2**31),
)
def test_a_job_crosses_the_wire_bit_for_bit(rank, init, frozen, merged, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (4, 8)}
    start = ClientStart(
        rank=rank,
        alpha=2.0 * rank,
        seed=seed * 1_000_003,
        init=_adapter(g, shapes, rank + 1) if init else None,
        frozen_a={n: torch.randn(6, i, generator=g) for n, (o, i) in shapes.items()} if frozen else None,
    )
    job = ClientJob(2, start, tuple(_adapter(g, shapes, 3) for _ in range(merged)))
    back = read_job(over_the_wire(job_content(job, 4, "fedit", not frozen, "seed = 0\n")))
    assert (back.client, back.start.rank, back.start.alpha, back.start.seed) == (2, rank, 2.0 * rank, seed * 1_000_003)
    for sent, got in zip([start.init, *job.base_deltas], [back.start.init, *back.base_deltas]):
        assert (sent is None) == (got is None)
        for n in sent or {}:
            assert (
                got[n].A.dtype == torch.float32
                and torch.equal(got[n].A, sent[n].A)
                and torch.equal(got[n].B, sent[n].B)
            )
    assert len(back.base_deltas) == merged
    if frozen:  # only the rows this client's rank uses travel
        assert all(torch.equal(back.start.frozen_a[n], start.frozen_a[n][:rank]) for n in shapes)
    else:
        assert back.start.frozen_a is None


def test_an_update_crosses_the_wire_and_ffa_sends_b_only():
    g = torch.Generator().manual_seed(0)
    frozen = {"q": torch.randn(4, 8, generator=g)}
    A = frozen["q"][:2].clone()
    update = ClientUpdate({"q": LoraFactors(A=A, B=torch.randn(8, 2, generator=g), scaling=2.0)}, 17, "client 1")
    log = TrainingLog(steps=3, tokens=90, losses=[1.5, 1.25, 1.0], seconds=0.5)
    for sends_a in (True, False):
        job = ClientJob(1, ClientStart(2, 4.0, 7, frozen_a=None if sends_a else frozen))
        config = job_config(job_content(job, 1, "g", sends_a, ""))
        content = over_the_wire(update_content(config, update, log))
        assert sorted(content.array_records["update"]) == (["q.A", "q.B"] if sends_a else ["q.B"])
        result = read_update(content, job)
        f = result.update.modules["q"]
        assert torch.equal(f.A, A) and torch.equal(f.B, update.modules["q"].B) and f.scaling == 2.0
        assert (result.client, result.update.num_examples, result.update.client_id) == (1, 17, "client 1")
        assert (result.log.steps, result.log.tokens, result.log.losses) == (3, 90, [1.5, 1.25, 1.0])


HUGE_LIST = [1.0] * (MAX_STEPS + 1)
# per field of a reply's `meta`: values the server must refuse, and values an honest client may send
HOSTILE_META = {
    "round": [0, -1, 2, 2**63 - 1, True, 1.0, "1", b"1", math.nan, [1]],
    "group": ["", "G", "g\n", "g" * 2000, 5, True, b"g", ["g"]],
    "client": [0, 2, -1, 2**63 - 1, True, 1.0, "1", [1]],
    "client-id": ["x" * 1_000_000, 5, True, b"client 1", ["client 1"]],
    "num-examples": [4, -1, 2**63 - 1, True, 5.0, math.nan, "5", [5]],
    "modules": ["q", [], ["q", "q"], ["q"] * 100, ["nope"], [1], [True], [b"q"], ["q" * 2000]],
    "scalings": [2.0, [], [math.nan], [math.inf], [True], ["2"], [2.0] * 100],
    "steps": [-1, True, 1.5, "3", 2**63 - 1, math.nan, [3]],
    "tokens": [-1, False, 90.0, "90", 2**63 - 1, [90]],
    "losses": [1.0, "1.0", [math.nan], [math.inf], [-1.0], [True, False], [b"1"], HUGE_LIST],
    "seconds": [math.nan, math.inf, -0.5, True, "0.5", 1e300, [0.5]],
}
HONEST_META = {
    "client-id": ["", "client 1"],
    "steps": [0, MAX_STEPS],
    "tokens": [0],
    "losses": [[], [0.0, 3.5]],
    "seconds": [0, 3, 0.0, 86400.5],
}


def _reply(field: str, value, drop: bool):
    g = torch.Generator().manual_seed(0)
    job = ClientJob(1, ClientStart(2, 4.0, 7))
    update = ClientUpdate(
        {"q": LoraFactors(A=torch.randn(2, 8, generator=g), B=torch.randn(8, 2, generator=g), scaling=2.0)},
        5,
        "client 1",
    )
    content = update_content(
        job_config(job_content(job, 1, "g", True, "")),
        update,
        TrainingLog(steps=1, tokens=90, losses=[1.5], seconds=0.5),
    )
    meta = content.config_records["meta"]
    if drop:
        del meta[field]
    else:
        meta[field] = value
    return over_the_wire(content), job


def _read(content, job):
    """What the server does with a reply: its echo of the job, then its update (from a node that holds 5 examples)."""
    flower._check_echo(content, 1, "g", 1)
    return read_update(content, job, num_examples=5)


@pytest.mark.parametrize("field", sorted(HOSTILE_META))
def test_a_reply_with_any_bad_meta_field_is_one_message_error_naming_it(field):
    """Wrong types, bools for numbers, NaN, Inf, negatives, huge numbers, strings and lists, a missing field: each
    field of a reply's ``meta`` is refused on its own with one line that names it; what an honest client may send is
    read as sent."""
    names_it = re.compile(
        rf"\b{re.escape(field)}(\[\d+\])? (is|has) |no '{field}'|answers the job|module names|"
        "no array"
    )
    for value, drop in [(v, False) for v in HOSTILE_META[field]] + [(None, True)]:
        with pytest.raises(MessageError) as refused:
            _read(*_reply(field, value, drop))
        message = str(refused.value)
        assert "\n" not in message and len(message) < 300 and names_it.search(message), (value, message)
    for value in HONEST_META.get(field, []):
        result = _read(*_reply(field, value, False))
        got = {
            "client-id": result.update.client_id,
            "steps": result.log.steps,
            "tokens": result.log.tokens,
            "losses": result.log.losses,
            "seconds": result.log.seconds,
        }[field]
        assert got == value and type(got) is (float if field == "seconds" else type(value)), (value, got)


class RecordingFederation:
    """A federation that plans one training group and keeps what the strategy hands it at the end of the round."""

    def __init__(self, group: TrainingGroup):
        self.group, self.branches, self.finished = group, group.branches, None

    def plan_round(self, round_number):
        return [self.group]

    def finish_round(self, round_number, groups, results, failures):
        self.finished = results, failures


def test_a_round_takes_one_reply_per_job_from_the_node_it_was_sent_to(monkeypatch):
    """A second reply to one job, a reply from another SuperNode, another example count than the node's own and a
    stray reply are each left out or ignored; an error's text reaches the round's record on one short line."""
    for key, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, key, value)
    jobs = [ClientJob(k, ClientStart(2, 4.0, 7)) for k in range(4)]
    federation = RecordingFederation(TrainingGroup("shared", make_branches(["fedit"], []), jobs))
    nodes = SimpleNamespace(node_of={k: 100 + k for k in range(4)}, sizes=[5, 5, 5, 5])
    strategy = flower.FloristStrategy(federation, nodes, "", log=lambda m: None)
    messages = strategy.configure_train(1, None, None, None)
    for i, m in enumerate(messages):
        m.metadata.__dict__["_message_id"] = f"job-{i}"

    def reply(m, num_examples=5, fill=1.0, sender=None):
        update = ClientUpdate(
            {"q": LoraFactors(A=torch.full((2, 8), fill), B=torch.ones(8, 2), scaling=2.0)}, num_examples, "client"
        )
        answer = Message(over_the_wire(update_content(job_config(m.content), update, TrainingLog())), reply_to=m)
        if sender is not None:
            answer.metadata.__dict__["_src_node_id"] = sender
        return answer

    stray = reply(messages[0])
    stray.metadata.__dict__["_reply_to_message_id"] = "never sent"
    failed = Message(Error(3, "Traceback:\n" + "y" * 10_000), reply_to=messages[3])
    replies = [
        reply(messages[0]),
        reply(messages[0], fill=9.0),
        reply(messages[1], sender=100),
        reply(messages[2], num_examples=6),
        failed,
        stray,
    ]
    strategy.aggregate_train(1, replies)
    results, failures = federation.finished
    (kept,) = results["shared"]
    assert kept.client == 0 and torch.equal(kept.update.modules["q"].A, torch.ones(2, 8))  # the first reply
    why = failures["shared"]
    assert sorted(why) == [1, 2, 3] and all("\n" not in w and len(w) < 400 for w in why.values()), why
    assert "came from SuperNode 100, not from SuperNode 101" in why[1]
    assert "num-examples is 6, but its SuperNode said it holds 5" in why[2]
    assert why[3].startswith("error: Traceback: yyy") and why[3].endswith("...")


@pytest.mark.parametrize("method", ["fedit", "flora", "flexlora", "ffa", "florist"])
def test_bytes_counted_from_the_messages_equal_florist_communication(method):
    shapes = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.self_attn.v_proj": (8, 16)}
    updates = synthetic_updates(shapes, [4, 2, 2], seed=1)
    if method == "ffa":
        updates = frozen_a_updates(updates)
    m = get_method(method, 0.9)
    prepared, weights = prepare(updates)
    result = m.aggregate(prepared, weights)
    comm = round_communication(m, prepared, result)
    frozen = {n: f.A for n, f in updates[0].modules.items()} if not m.sends_a else None
    for k, u in enumerate(updates):
        start = ClientStart(u.modules[next(iter(shapes))].rank, 8.0, 0, frozen_a=frozen)
        config = job_config(job_content(ClientJob(k, start), 1, "shared", m.sends_a, ""))
        assert uplink_bytes(update_content(config, u, TrainingLog()))["adapter"] == comm.upload_bytes[k]
        # the next round ships the result to the client: as its init (re-init) or as the newest merged update
        for init, merged in ((result.for_client(k), ()), (None, (result.for_client(k),) * 2)):
            job = ClientJob(k, ClientStart(start.rank, 8.0, 0, init=init, frozen_a=frozen), merged)
            down = downlink_bytes(job_content(job, 2, method, m.sends_a, ""))
            assert down["adapter"] == comm.download_bytes[k]
            assert down["total"] == down["adapter"] + down["resent_state"] + down["frozen_a"]
            assert (down["resent_state"] > 0) == (bool(merged) or not m.sends_a)


def test_a_node_is_the_client_its_partition_id_names():
    config = load_config(None, FAST)

    def context(**node_config):
        return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})

    assert node_client(context(**{"partition-id": 2, "num-partitions": 3}), config) == 2
    with pytest.raises(MessageError, match="no partition-id"):
        node_client(context(), config)
    with pytest.raises(MessageError, match="num-partitions=4"):
        node_client(context(**{"partition-id": 1, "num-partitions": 4}), config)
    with pytest.raises(MessageError, match="out of range"):
        node_client(context(**{"partition-id": 3}), config)
    for bad in ("2", True, 1.5):
        with pytest.raises(MessageError, match=f"node config: partition-id is {re.escape(repr(bad))}, not an integer"):
            node_client(context(**{"partition-id": bad}), config)


BAD_JOB_FIELDS = [
    ("round", 0),
    ("round", "1"),
    ("client", -1),
    ("client", 2.0),
    ("rank", 0),
    ("rank", True),
    ("alpha", math.nan),
    ("alpha", -4.0),
    ("alpha", "4"),
    ("seed", 1.5),
    ("base-deltas", 1),
    ("base-deltas", -1),
    ("sends-a", 1),
    ("group", 7),
    ("config", b"seed = 0"),
]


@pytest.mark.parametrize("field, value", BAD_JOB_FIELDS + [(f, None) for f in sorted({f for f, _ in BAD_JOB_FIELDS})])
def test_a_node_refuses_a_job_with_a_bad_field_in_one_line_naming_it(field, value):
    """What a ClientApp reads of a training message (``read_job``, the echo in ``update_content``, the config) is
    read by the same field readers as the server's replies: a wrong, missing or out-of-range field is one line."""
    content = job_content(ClientJob(1, ClientStart(2, 4.0, 7)), 1, "g", True, "seed = 0\n")
    job = job_config(content)
    if value is None:
        del job[field]
    else:
        job[field] = value
    update = ClientUpdate({"q": LoraFactors(A=torch.ones(2, 8), B=torch.ones(8, 2), scaling=2.0)}, 5, "client 1")
    with pytest.raises(MessageError) as refused:
        read_job(content)
        update_content(job, update, TrainingLog())
        str_field(job, "config", "the message", MAX_CONFIG)
    message = str(refused.value)
    assert "\n" not in message and (f"{field} is " in message or f"no '{field}'" in message), message


def test_a_deployment_refuses_a_run_config_value_of_the_wrong_type():
    assert DeploymentSettings.from_run_config({"config": "run.toml", "round-timeout": 5}).round_timeout == 5.0
    for key, value in (("overwrite", "false"), ("round-timeout", "5"), ("node-wait", -1.0), ("config", 3)):
        with pytest.raises(ConfigError, match=f"the run config: {key} is "):
            DeploymentSettings.from_run_config({"config": "run.toml", key: value})


def test_a_node_reads_its_own_client_file_only(tmp_path, monkeypatch):
    import florist.data.instructions as instructions

    for k in range(3):
        rows = [{"instruction": f"q{k}.{i}", "input": "", "output": f"a{k}.{i}"} for i in range(3 + k)]
        (tmp_path / f"client_{k}.json").write_text(json.dumps(rows))
    config = load_config(None, FAST + [f'data.train="{tmp_path}"'])
    tokenizer = tiny_llama(0)[1]
    whole, _ = run_module.load_client_examples(config, tokenizer)
    read = []
    real = instructions.read_json_rows
    monkeypatch.setattr(instructions, "read_json_rows", lambda path: read.append(Path(path).name) or real(path))
    for k in range(3):
        read.clear()
        assert run_module.load_partition_examples(config, tokenizer, k) == whole[k]
        assert read == [f"client_{k}.json"]


def test_a_node_of_a_split_dataset_keeps_its_own_part():
    config = load_config(None, FAST)  # the built-in data, split over 3 clients
    tokenizer = tiny_llama(0)[1]
    whole, _ = run_module.load_client_examples(config, tokenizer)
    assert [run_module.load_partition_examples(config, tokenizer, k) for k in range(3)] == whole


# --- the strategy over a Grid in this process ------------------------------------------------------------------------


class LoopbackGrid(Grid):
    """A Grid whose SuperNodes are ClientApps called in this process; every record is serialised both ways."""

    def __init__(self, app, num_nodes: int):
        self.app = app
        self.contexts = {
            100 + k: Context(
                run_id=1,
                node_id=100 + k,
                node_config={"partition-id": k, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for k in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}
        self.received: list[Message] = []

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            delivered = Message(metadata=m.metadata, content=over_the_wire(m.content))
            try:
                reply = self.app(delivered, self.contexts[m.metadata.dst_node_id])
                reply = Message(metadata=reply.metadata, content=over_the_wire(reply.content))
            except Exception as e:  # what a SuperNode does with a ClientApp that raised
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            self.received.append(delivered)
            self.replies[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture
def loopback(monkeypatch, tiny_models):
    """``florist run --engine flower`` with Flower's simulation replaced by a LoopbackGrid; yields the grids used."""
    import flwr.simulation

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what the simulation sets for the ServerApp's messages
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    grids = []

    def run_simulation(server_app, client_app, num_supernodes, backend_config=None):
        grids.append(LoopbackGrid(client_app, num_supernodes))
        server_app(grids[-1], Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)
    return grids


def run(tmp_path, name, *overrides, **kw):
    cfg = load_config(None, FAST + [f'output="{tmp_path / name}"', *overrides])
    return run_module.run(cfg, progress=False, log=lambda m: None, **kw)


def assert_same_runs(a: Path, b: Path) -> int:
    """Every adapter (clients' and globals') bit for bit, and every metric but timings; returns the adapter count."""
    adapters = sorted(p.parent.relative_to(a) for p in a.rglob("adapter_model.safetensors"))
    assert adapters == sorted(p.parent.relative_to(b) for p in b.rglob("adapter_model.safetensors"))
    for rel in adapters:
        fa, fb = read_adapter(a / rel)[0], read_adapter(b / rel)[0]
        assert fa.keys() == fb.keys()
        for n in fa:
            assert torch.equal(fa[n].A, fb[n].A) and torch.equal(fb[n].B, fa[n].B), (rel, n)
    ma, mb = (_untimed([json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]) for p in (a, b))
    assert ma == mb
    return len(adapters)


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in ("seconds", "server_seconds")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def traffic(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / flower.TRAFFIC_FILE).read_text().splitlines()]


def test_the_flower_app_reproduces_the_in_process_engine_under_reinit_and_sampling(tmp_path, loopback):
    args = (
        ALL_METHODS,
        'federation.scheme="reinit"',
        "federation.clients_per_round=2",
        "federation.rounds=2",
        'federation.thresholds="0.5,0.9"',
    )
    inprocess = run(tmp_path, "inprocess", *args)
    over_flower = run(tmp_path, "flower", 'engine="flower"', *args)
    assert assert_same_runs(inprocess, over_flower) > 0
    # one message per sampled client per training group; round 2 starts from each branch's own global adapter
    messages = [m for m in loopback[0].received if m.metadata.message_type == "train"]
    assert len(messages) == 2 * 2 + 6 * 2  # round 1: shared + ffa groups; round 2: a group per branch
    assert all("init" in m.content.array_records for m in messages if job_config(m.content)["round"] == 2)


def test_a_failing_client_is_left_out_while_min_clients_reply(tmp_path, loopback, monkeypatch):
    def client_2_fails(message, context, call_next):
        if message.metadata.message_type == "train" and context.node_config["partition-id"] == 2:
            raise RuntimeError("disk full")
        return call_next(message, context)

    import florist.engines.flower_app as flower_app

    real = flower_app.client_app
    monkeypatch.setattr(flower_app, "client_app", lambda load_model=None, mods=(): real(load_model, [client_2_fails]))
    path = run(
        tmp_path,
        "r",
        'engine="flower"',
        'federation.methods=["fedit"]',
        "federation.min_clients=2",
        "federation.rounds=2",
    )
    records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["participants"] for r in records] == [[0, 1], [0, 1]]
    for line in traffic(path):
        status = {c["client"]: c["status"] for c in line["clients"]}
        assert status[0] == status[1] == "replied" and "disk full" in status[2]

    with pytest.raises(RoundFailed, match="2 of 3 clients replied"):
        run(tmp_path, "strict", 'engine="flower"', 'federation.methods=["fedit"]', "federation.min_clients=3")
    assert not (tmp_path / "strict" / "state.json").exists()  # the failed round left nothing behind


# --- Flower's simulation engine --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_florist_run_engine_flower_matches_the_in_process_engine(tmp_path, tiny_models, one_thread, monkeypatch):
    from florist.cli import app

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))  # Flower's own files, out of the home directory
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")

    args = [ALL_METHODS, "federation.rounds=2", 'federation.thresholds="0.5,0.9"']
    began = time.perf_counter()
    cli = CliRunner().invoke(
        app,
        [
            "run",
            "--engine",
            "flower",
            "--quiet",
            "--output",
            str(tmp_path / "flower"),
            *[x for a in FAST + args for x in ("--set", a)],
        ],
    )
    seconds = time.perf_counter() - began
    assert cli.exit_code == 0, cli.output
    print(f"florist run --engine flower: {seconds:.1f} s")
    inprocess = run(tmp_path, "inprocess", *args)
    assert assert_same_runs(inprocess, tmp_path / "flower") > 0

    # the adapter traffic counted from the messages is florist.communication's: uploads in the round, and the
    # round-1 global adapters as they go down in round 2 (the merged update the clients train on)
    records = {
        (r["round"], r["branch"]): r["communication"]
        for r in (json.loads(x) for x in (inprocess / "metrics.jsonl").read_text().splitlines())
        if r["round"]
    }
    lines = traffic(tmp_path / "flower")
    for line in lines:
        for branch in line["branches"]:
            comm = records[(line["round"], branch)]
            assert [c["up"]["adapter"] for c in line["clients"]] == comm["upload_bytes"]
        if line["round"] == 2:
            (branch,) = line["branches"]
            assert [c["down"]["adapter"] for c in line["clients"]] == records[(1, branch)]["download_bytes"]
    assert {c["status"] for line in lines for c in line["clients"]} == {"replied"}


def test_the_traffic_record_keeps_the_whole_rounds_before_a_line_a_crash_cut_short(tmp_path):
    from florist.engines.flower import TrafficLog

    path = tmp_path / "flower_traffic.jsonl"
    whole = [{"round": 1, "group": "shared", "clients": []}, {"round": 2, "group": "shared", "clients": []}]
    path.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in whole) + b'{"round": 3, "gro')
    assert TrafficLog(path, done=2).lines() == whole  # the torn third line is dropped, and the file rewritten
    assert path.read_text().count("\n") == 2
    assert TrafficLog(path, done=1).lines() == whole[:1]  # lines of rounds that did not finish go too
    path.write_bytes(b'["not a record"]\n' + json.dumps(whole[0]).encode() + b"\n")
    assert TrafficLog(path, done=2).lines() == []
