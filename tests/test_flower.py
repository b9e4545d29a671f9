"""florist on Flower: the records, the engine over a Grid, the simulation engine against the in-process one, and the
florist strategy inside a ServerApp written like Flower's flowertune-llm template.

Most tests drive the real ServerApp and ClientApp through a Grid that calls the ClientApps in this process (with
every record, the nodes' state included, serialised and parsed back as on the wire); two run on Flower's simulation
engine (Ray, one SuperNode per client).
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st
from test_federation import TINY_RUN
from test_method_plugin import CoreMean, LocalB
from typer.testing import CliRunner

import florist.engines.flower as flower
import florist.engines.flower_app as flower_app
import florist.run as run_module
import florist.setup as run_setup
from florist.adapters import read_adapter
from florist.aggregation import ClientUpdate, LoraFactors, ModuleAggregate, prepare
from florist.communication import round_communication
from florist.config import ConfigError, load_config
from florist.engines.flower_app import MAX_CONFIG, DeploymentSettings, keep_factors, kept_factors, node_client
from florist.engines.flower_messages import (
    MAX_STEPS,
    MessageError,
    check_echo,
    downlink_bytes,
    job_config,
    job_content,
    read_job,
    read_update,
    str_field,
    update_content,
    uplink_bytes,
)
from florist.engines.flower_strategy import FederatedLoRA
from florist.jobs import (
    BOTH_FACTORS,
    BaseDelta,
    ClientJob,
    ClientMode,
    ClientStart,
    ClientUpload,
    TrainingLog,
    cut_upload,
    upload_of,
)
from florist.methods import aggregate, get_method, register, unregister
from florist.models import tiny_llama
from florist.server import RoundFailed
from florist.synthetic import frozen_a_updates, synthetic_updates

FAST = [*TINY_RUN, "eval.limit=8", "lora.ranks=[4,2,2]"]
ALL_METHODS = 'federation.methods=["florist","fedit","flexlora","ffa","flora"]'
MODES = [
    BOTH_FACTORS,
    ClientMode(trains={"B"}, shared={"A"}),
    ClientMode(trains={"A"}, shared={"B"}),
    ClientMode(trains={"A", "B"}, keeps={"B"}),
    ClientMode(trains={"R"}, shared={"A", "B"}, core=True),
]


def tiny(name, dtype, device):
    return tiny_llama(0)


def over_the_wire(content: RecordDict) -> RecordDict:
    """Serialise a record dict as Flower does for transport and parse it back."""
    objects = get_all_nested_objects(content)
    return inflate_object_from_contents(content.object_id, {i: o.deflate() for i, o in objects.items()})


@pytest.fixture
def tiny_models(monkeypatch):
    monkeypatch.setattr(run_setup, "load_model", tiny)  # the server's copy
    monkeypatch.setattr(flower_app, "load_model", tiny)  # the ClientApps'


@pytest.fixture
def message_identity(monkeypatch):
    """What Flower sets for a ServerApp's messages (its run, task and node), so that tests can build them."""
    for key, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, key, value)


# --- records ---------------------------------------------------------------------------------------------------------

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (4, 8)}


def _adapter(g, shapes, rank):
    return {
        n: ModuleAggregate(A=torch.randn(rank, i, generator=g), B=torch.randn(o, rank, generator=g))
        for n, (o, i) in shapes.items()
    }


def _shared(g, mode, shapes, rank):
    return {
        n: {f: torch.randn(*((rank, i) if f == "A" else (o, rank)), generator=g) for f in mode.shared}
        for n, (o, i) in shapes.items()
    }


def _trained(g, mode, shapes, rank):
    """Everything a client of ``mode`` holds after training: A and B, and R with a core."""
    out = {}
    for n, (o, i) in shapes.items():
        out[n] = {"A": torch.randn(rank, i, generator=g), "B": torch.randn(o, rank, generator=g)}
        if mode.core:
            out[n]["R"] = torch.randn(rank, rank, generator=g)
    return out


@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(1, 6),
    mode=st.sampled_from(MODES),
    init=st.booleans(),
    merged=st.integers(0, 3),
    keep_from=st.sampled_from([None, "localb"]),
    seed=st.integers(0, 2**31),
)
def test_a_job_crosses_the_wire_bit_for_bit(rank, mode, init, merged, keep_from, seed):
    g = torch.Generator().manual_seed(seed)
    start = ClientStart(
        rank=rank,
        alpha=2.0 * rank,
        seed=seed * 1_000_003,
        mode=mode,
        init=_adapter(g, SHAPES, rank + 1) if init else None,
        shared=_shared(g, mode, SHAPES, 6) if mode.shared else None,
        keep_from=keep_from,
        keep_as=("localb", "localb@0.50") if mode.keeps else (),
    )
    deltas = tuple(BaseDelta.of(f"localb/{r:03d}/global", _adapter(g, SHAPES, 3)) for r in range(merged))
    job = ClientJob(2, start, deltas, group="localb")
    back = read_job(over_the_wire(job_content(job, 4, "seed = 0\n")))
    assert (back.client, back.group, back.start.rank, back.start.alpha) == (2, "localb", rank, 2.0 * rank)
    assert (back.start.seed, back.start.mode, back.start.keep_from, back.start.keep_as) == (
        seed * 1_000_003,
        mode,
        keep_from,
        start.keep_as,
    )
    assert [d.key for d in back.base_deltas] == [d.key for d in deltas]
    for sent, got in zip([start.init, *job.base_adapters()], [back.start.init, *back.base_adapters()]):
        assert (sent is None) == (got is None)
        for n in sent or {}:
            assert got[n].A.dtype == torch.float32
            assert torch.equal(got[n].A, sent[n].A) and torch.equal(got[n].B, sent[n].B)
    assert len(back.base_deltas) == merged
    if mode.shared:  # only the part this client's rank uses travels: A's leading rows, B's leading columns
        for n in SHAPES:
            assert back.start.shared[n].keys() == mode.shared
            for f, t in back.start.shared[n].items():
                assert torch.equal(t, start.shared[n][f][:rank] if f == "A" else start.shared[n][f][:, :rank])
    else:
        assert back.start.shared is None


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.describe())
def test_an_upload_crosses_the_wire_holding_exactly_what_its_mode_uploads(mode):
    g = torch.Generator().manual_seed(0)
    job = ClientJob(1, ClientStart(2, 4.0, 7, mode=mode), group="g")
    upload = ClientUpload(upload_of(job.start, _trained(g, mode, SHAPES, 2)), {n: 2.0 for n in SHAPES}, 17)
    log = TrainingLog(steps=3, tokens=90, losses=[1.5, 1.25, 1.0], seconds=0.5)
    content = over_the_wire(update_content(job_config(job_content(job, 1, "")), upload, log))
    assert sorted(content.array_records["update"]) == sorted(f"{n}.{f}" for n in SHAPES for f in mode.uploads)
    reply = read_update(content, job)
    assert (reply.client, reply.upload.num_examples, reply.upload.scalings) == (1, 17, {n: 2.0 for n in SHAPES})
    for n in SHAPES:
        assert reply.upload.factors[n].keys() == mode.uploads
        assert all(torch.equal(t, upload.factors[n][f]) for f, t in reply.upload.factors[n].items())
    assert (reply.log.steps, reply.log.tokens, reply.log.losses) == (3, 90, [1.5, 1.25, 1.0])


@pytest.mark.parametrize(
    "mode, change, refusal",
    [
        (MODES[1], lambda r: r.__setitem__("q.A", Array(torch.ones(2, 8).numpy())), "array 'q.A' is none of"),
        (MODES[3], lambda r: r.__setitem__("q.B", Array(torch.ones(8, 2).numpy())), "array 'q.B' is none of"),
        (MODES[4], lambda r: r.__setitem__("q.A", Array(torch.ones(2, 8).numpy())), "array 'q.A' is none of"),
        (MODES[4], lambda r: r.__delitem__("q.R"), "no array 'q.R'"),
        (BOTH_FACTORS, lambda r: r.__delitem__("q.A"), "no array 'q.A'"),
        (BOTH_FACTORS, lambda r: r.__setitem__("q.R", Array(torch.ones(2, 2).numpy())), "array 'q.R' is none of"),
    ],
)
def test_a_reply_whose_factors_are_not_its_modes_is_refused_in_one_line(mode, change, refusal):
    """A forged shared factor, a factor the client was to keep, a missing one: the reply is refused, never read."""
    g = torch.Generator().manual_seed(0)
    job = ClientJob(1, ClientStart(2, 4.0, 7, mode=mode), group="g")
    upload = ClientUpload(upload_of(job.start, _trained(g, mode, {"q": (8, 8)}, 2)), {"q": 2.0}, 5)
    content = update_content(job_config(job_content(job, 1, "")), upload, TrainingLog())
    change(content.array_records["update"])
    with pytest.raises(MessageError) as refused:
        read_update(over_the_wire(content), job)
    assert refusal in str(refused.value) and "\n" not in str(refused.value), refused.value


HUGE_LIST = [1.0] * (MAX_STEPS + 1)
# per field of a reply's `meta`: values the server must refuse, and values an honest client may send
HOSTILE_META = {
    "round": [0, -1, 2, 2**63 - 1, True, 1.0, "1", b"1", math.nan, [1]],
    "group": ["", "G", "g\n", "g" * 2000, 5, True, b"g", ["g"]],
    "client": [0, 2, -1, 2**63 - 1, True, 1.0, "1", [1]],
    "num-examples": [4, -1, 2**63 - 1, True, 5.0, math.nan, "5", [5]],
    "modules": ["q", [], ["q", "q"], ["q"] * 100, ["nope"], [1], [True], [b"q"], ["q" * 2000]],
    "scalings": [2.0, [], [math.nan], [math.inf], [True], ["2"], [2.0] * 100],
    "steps": [-1, True, 1.5, "3", 2**63 - 1, math.nan, [3]],
    "tokens": [-1, False, 90.0, "90", 2**63 - 1, [90]],
    "losses": [1.0, "1.0", [math.nan], [math.inf], [-1.0], [True, False], [b"1"], HUGE_LIST],
    "seconds": [math.nan, math.inf, -0.5, True, "0.5", 1e300, [0.5]],
}
HONEST_META = {
    "steps": [0, MAX_STEPS],
    "tokens": [0],
    "losses": [[], [0.0, 3.5]],
    "seconds": [0, 3, 0.0, 86400.5],
}


def _reply(field: str, value, drop: bool):
    g = torch.Generator().manual_seed(0)
    job = ClientJob(1, ClientStart(2, 4.0, 7), group="g")
    upload = ClientUpload(
        {"q": {"A": torch.randn(2, 8, generator=g), "B": torch.randn(8, 2, generator=g)}}, {"q": 2.0}, 5
    )
    content = update_content(
        job_config(job_content(job, 1, "")), upload, TrainingLog(steps=1, tokens=90, losses=[1.5], seconds=0.5)
    )
    meta = content.config_records["meta"]
    if drop:
        del meta[field]
    else:
        meta[field] = value
    return over_the_wire(content), job


def _read(content, job):
    """What the server does with a reply: its echo of the job, then its upload (from a node that holds 5 examples)."""
    check_echo(content, 1, "g", 1)
    return read_update(content, job, num_examples=5)


@pytest.mark.parametrize("field", sorted(HOSTILE_META))
def test_a_reply_with_any_bad_meta_field_is_one_message_error_naming_it(field):
    """Wrong types, bools for numbers, NaN, Inf, negatives, huge numbers, strings and lists, a missing field: each
    field of a reply's ``meta`` is refused on its own with one line that names it; what an honest client may send is
    read as sent."""
    names_it = re.compile(
        rf"\b{re.escape(field)}(\[\d+\])? (is|has) |no '{field}'|answers the job|module names|no array|is none of"
    )
    for value, drop in [(v, False) for v in HOSTILE_META[field]] + [(None, True)]:
        with pytest.raises(MessageError) as refused:
            _read(*_reply(field, value, drop))
        message = str(refused.value)
        assert "\n" not in message and len(message) < 300 and names_it.search(message), (value, message)
    for value in HONEST_META.get(field, []):
        reply = _read(*_reply(field, value, False))
        got = {"steps": reply.log.steps, "tokens": reply.log.tokens, "losses": reply.log.losses}.get(
            field, reply.log.seconds
        )
        assert got == value and type(got) is (float if field == "seconds" else type(value)), (value, got)


@pytest.mark.parametrize("method", ["fedit", "flora", "flexlora", "ffa", "florist"])
def test_bytes_counted_from_the_messages_equal_florist_communication(method):
    shapes = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.self_attn.v_proj": (8, 16)}
    m = get_method(method)
    mode = m.mode(1)
    updates = synthetic_updates(shapes, [4, 2, 2], seed=1)
    if mode.shared:
        updates = frozen_a_updates(updates)
    prepared, _ = prepare(updates)
    result = aggregate(m, updates)
    comm = round_communication(m, 1, prepared, result)
    for k, u in enumerate(updates):
        rank = u.modules[next(iter(shapes))].rank
        shared = {n: {"A": f.A} for n, f in updates[0].modules.items()} if mode.shared else None
        start = ClientStart(rank, 8.0, 0, mode=mode, shared=shared)
        trained = {n: {"A": f.A, "B": f.B} for n, f in u.modules.items()}
        upload = ClientUpload(upload_of(start, trained), {n: f.scaling for n, f in u.modules.items()}, u.num_examples)
        config = job_config(job_content(ClientJob(k, start), 1, ""))
        assert uplink_bytes(update_content(config, upload, TrainingLog()))["adapter"] == comm.upload_bytes[k]
        # the next round ships the result to the client: as its init (re-init) or as the newest merged update
        past = tuple(BaseDelta.of(f"m/{r:03d}/global", result.for_client(k)) for r in (1, 2))
        for init, merged in ((result.for_client(k), ()), (None, past)):
            job = ClientJob(k, ClientStart(rank, 8.0, 0, mode=mode, init=init, shared=shared), merged)
            down = downlink_bytes(job_content(job, 2, ""))
            assert down["adapter"] == comm.download_bytes[k]
            assert down["total"] == down["adapter"] + down["resent_state"] + down["shared"]
            assert (down["resent_state"] > 0) == (bool(merged) or mode.uploads != {"A", "B"})
            assert (down["shared"] > 0) == bool(mode.shared)


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
    ("base-keys", "florist/001/global"),
    ("base-keys", [5]),
    ("base-keys", ["x" * 3000]),
    ("trains", "A"),
    ("trains", ["A", "C"]),
    ("trains", ["AB"]),
    ("shared", ["A"] * 4),
    ("keeps", [1]),
    ("core", 1),
    ("keep-from", 5),
    ("keep-as", "localb"),
    ("keep-as", [5]),
    ("group", 7),
    ("config", b"seed = 0"),
]


@pytest.mark.parametrize("field, value", BAD_JOB_FIELDS + [(f, None) for f in sorted({f for f, _ in BAD_JOB_FIELDS})])
def test_a_node_refuses_a_job_with_a_bad_field_in_one_line_naming_it(field, value):
    """What a ClientApp reads of a training message (``read_job``, the echo in ``update_content``, the config) is
    read by the same field readers as the server's replies: a wrong, missing or out-of-range field is one line."""
    content = job_content(ClientJob(1, ClientStart(2, 4.0, 7), group="g"), 1, "seed = 0\n")
    job = job_config(content)
    if value is None:
        del job[field]
    else:
        job[field] = value
    upload = ClientUpload({"q": {"A": torch.ones(2, 8), "B": torch.ones(8, 2)}}, {"q": 2.0}, 5)
    with pytest.raises(MessageError) as refused:
        read_job(content)
        update_content(job, upload, TrainingLog())
        str_field(job, "config", "the message", MAX_CONFIG)
    message = str(refused.value)
    assert "\n" not in message and re.search(rf"{re.escape(field)}(\[\d+\])? (is|has) |no '{field}'", message), message


@pytest.mark.parametrize(
    "mode, refusal",
    [
        ({"trains": ["R"]}, "trains R exactly when it has a core"),
        ({"shared": ["A"]}, "shared factors are frozen A or B"),  # A both trains and is shared
        ({"keeps": ["B"], "shared": ["B"], "trains": ["A"]}, "kept factors are A or B that are not shared"),
        ({"trains": []}, "a client mode trains some of A, B and R"),
    ],
)
def test_a_node_refuses_a_job_whose_mode_cannot_be_in_one_line(mode, refusal):
    content = job_content(ClientJob(1, ClientStart(2, 4.0, 7), group="g"), 1, "")
    job_config(content).update(mode)
    with pytest.raises(MessageError, match=refusal) as refused:
        read_job(content)
    assert str(refused.value).startswith("round 1 client 1's job: ") and "\n" not in str(refused.value)


def test_a_node_refuses_a_job_carrying_shared_factors_its_mode_does_not_share():
    g = torch.Generator().manual_seed(0)
    start = ClientStart(2, 4.0, 7, mode=MODES[1], shared=_shared(g, MODES[1], SHAPES, 2))
    content = job_content(ClientJob(1, start, group="ffa"), 1, "")
    job_config(content).update({"trains": ["A", "B"], "shared": []})
    with pytest.raises(MessageError, match="an unexpected array record 'shared'"):
        read_job(content)
    content = job_content(ClientJob(1, start, group="ffa"), 1, "")
    del content["shared"]
    with pytest.raises(MessageError, match="no array record 'shared'"):
        read_job(content)


def test_a_nodes_kept_factors_survive_its_state_crossing_the_wire_under_every_branch_name():
    g = torch.Generator().manual_seed(0)
    mode = MODES[3]  # keeps B
    kept = {n: {"B": torch.randn(o, 2, generator=g)} for n, (o, i) in SHAPES.items()}
    state = RecordDict()
    keep_factors(state, ClientStart(2, 4.0, 7, mode=mode, keep_as=("localb", "localb@0.50")), kept)
    state = over_the_wire(state)
    for name in ("localb", "localb@0.50"):
        back = kept_factors(state, ClientStart(2, 4.0, 8, mode=mode, keep_from=name))
        assert back.keys() == kept.keys() and all(torch.equal(back[n]["B"], kept[n]["B"]) for n in SHAPES)
    assert kept_factors(state, ClientStart(2, 4.0, 8, mode=mode)) is None  # a first round starts fresh
    assert kept_factors(state, ClientStart(2, 4.0, 8, mode=mode, keep_from="other")) is None
    keep_factors(state, ClientStart(2, 4.0, 7, keep_as=("fedit",)), {n: {} for n in SHAPES})
    assert "florist.kept.fedit" not in state.array_records  # a mode that keeps nothing stores nothing


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
    whole, _ = run_setup.load_client_examples(config, tokenizer)
    read = []
    real = instructions.read_json_rows
    monkeypatch.setattr(instructions, "read_json_rows", lambda path: read.append(Path(path).name) or real(path))
    for k in range(3):
        read.clear()
        assert run_setup.load_partition_examples(config, tokenizer, k) == whole[k]
        assert read == [f"client_{k}.json"]


def test_a_node_of_a_split_dataset_keeps_its_own_part():
    config = load_config(None, FAST)  # the built-in data, split over 3 clients
    tokenizer = tiny_llama(0)[1]
    whole, _ = run_setup.load_client_examples(config, tokenizer)
    assert [run_setup.load_partition_examples(config, tokenizer, k) for k in range(3)] == whole


# --- the engine over a scripted Grid ---------------------------------------------------------------------------------


class ScriptedGrid:
    """A Grid whose SuperNodes answer as the test says: ``answer(message)`` is the list of replies it gets."""

    def __init__(self, answer):
        self.answer, self.timeouts, self.sent = answer, [], []

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"job-{len(self.sent)}"  # as Flower's grids do, in place
            self.sent.append(m)
            replies += self.answer(m)
        return replies


def honest_reply(message, num_examples=5, fill=1.0, sender=None):
    upload = ClientUpload({"q": {"A": torch.full((2, 8), fill), "B": torch.ones(8, 2)}}, {"q": 2.0}, num_examples)
    reply = Message(over_the_wire(update_content(job_config(message.content), upload, TrainingLog())), reply_to=message)
    if sender is not None:
        reply.metadata.__dict__["_src_node_id"] = sender
    return reply


def test_a_round_takes_one_checked_reply_per_job_from_the_node_it_was_sent_to(tmp_path, message_identity):
    """A second reply to one job, a reply from another SuperNode, another example count than the node's own, an error
    (its text on one short line), a stray reply, a client without a SuperNode and one that never answers: one reply
    is taken, and every other job gets its reason, in the round's replies and in the traffic record."""

    def answer(m):
        client = job_config(m.content)["client"]
        if client == 0:
            stray = honest_reply(m)
            stray.metadata.__dict__["_reply_to_message_id"] = "never sent"
            return [honest_reply(m), honest_reply(m, fill=9.0), stray]
        if client == 1:
            return [honest_reply(m, sender=100)]
        if client == 2:
            return [honest_reply(m, num_examples=6)]
        if client == 3:
            return [Message(Error(3, "Traceback:\n" + "y" * 10_000), reply_to=m)]
        return []  # client 5 never answers within the round

    grid = ScriptedGrid(answer)
    nodes = SimpleNamespace(node_of={k: 100 + k for k in (0, 1, 2, 3, 5)}, sizes=[5] * 6, refresh=lambda timeout: None)
    traffic = flower.TrafficLog(tmp_path / flower.TRAFFIC_FILE, done=0)
    engine = flower.FlowerEngine(grid, nodes, "", round_timeout=30.0, traffic=traffic, log=lambda m: None)
    jobs = [ClientJob(k, ClientStart(2, 4.0, 7), group="shared") for k in range(6)]
    replies = engine.train(1, jobs)

    assert grid.timeouts == [pytest.approx(30.0, abs=1)] and [m.metadata.dst_node_id for m in grid.sent] == [
        100,
        101,
        102,
        103,
        105,
    ]
    (kept,) = replies.replies
    assert kept.client == 0 and torch.equal(kept.upload.factors["q"]["A"], torch.ones(2, 8))  # the first reply
    why = {client: reason for (group, client), reason in replies.failures.items() if group == "shared"}
    assert sorted(replies.failures) == [("shared", k) for k in (1, 2, 3, 4, 5)]
    assert sorted(why) == [1, 2, 3, 4, 5] and all("\n" not in w and len(w) < 400 for w in why.values()), why
    assert "came from SuperNode 100, not from SuperNode 101" in why[1]
    assert "num-examples is 6, but its SuperNode said it holds 5" in why[2]
    assert why[3].startswith("error: Traceback: yyy") and " ... yyy" in why[3]  # its start and its end
    assert (why[4], why[5]) == (flower.NO_NODE, flower.NO_REPLY)
    (line,) = traffic.lines()
    assert (line["round"], line["group"]) == (1, "shared")
    assert {c["client"]: c["status"] for c in line["clients"]} == {0: "replied", **why}
    assert line["clients"][0]["up"]["adapter"] == (2 * 8 + 8 * 2) * 4 and line["clients"][4]["down"] is None


def test_a_rounds_jobs_go_out_one_a_node_at_a_time_under_the_round_timeout(tmp_path, message_identity, monkeypatch):
    """Two training groups, two clients each, a third client in one group only: two waves of at most one message a
    node (a node's second job starts from the state its first left), under one deadline, and each reply and traffic
    line kept under its own group (a client with a job in both answers each)."""
    grid = ScriptedGrid(lambda m: [] if job_config(m.content)["group"] == "late" else [honest_reply(m)])
    clock = iter([0.0, 0.0, 0.0, 12.5])  # the round starts; its first wave took 12.5 s
    monkeypatch.setattr(flower.time, "monotonic", lambda: next(clock, 100.0))
    nodes = SimpleNamespace(node_of={0: 100, 1: 101, 2: 102}, sizes=[5, 5, 5], refresh=lambda timeout: None)
    traffic = flower.TrafficLog(tmp_path / flower.TRAFFIC_FILE, done=0)
    engine = flower.FlowerEngine(grid, nodes, "", round_timeout=30.0, traffic=traffic, log=lambda m: None)
    jobs = [ClientJob(k, ClientStart(2, 4.0, 7), group=g) for g in ("shared", "late") for k in range(2)]
    jobs.insert(2, ClientJob(2, ClientStart(2, 4.0, 7), group="late"))
    replies = engine.train(1, jobs)
    assert [m.metadata.dst_node_id for m in grid.sent] == [100, 101, 102, 100, 101]  # two waves
    assert grid.timeouts == [30.0, 17.5]  # what is left of the round's 30 s
    replies.failures.pop(("late", 2))
    assert [(r.group, r.client) for r in replies.replies] == [("shared", 0), ("shared", 1)]
    assert replies.failures == {("late", 0): flower.NO_REPLY, ("late", 1): flower.NO_REPLY}
    assert [r.client for r in replies.of_group("shared").replies] == [0, 1] and not replies.of_group("late").replies
    assert [line["group"] for line in traffic.lines()] == ["shared", "late"]


def test_a_node_that_failed_a_wave_is_sent_nothing_more_that_round(tmp_path, message_identity):
    """Client 1's node answers its first job with an error (Flower's, for a node that went away): its second job is
    not sent, so a dead node costs the round one wait, not one a wave; client 0 gets both."""

    def answer(m):
        if job_config(m.content)["client"] == 1:
            return [Message(Error(0, "Node Unavailable"), reply_to=m)]
        return [honest_reply(m)]

    grid = ScriptedGrid(answer)
    nodes = SimpleNamespace(node_of={0: 100, 1: 101}, sizes=[5, 5], refresh=lambda timeout: None)
    engine = flower.FlowerEngine(grid, nodes, "", round_timeout=30.0, log=lambda m: None)
    jobs = [ClientJob(k, ClientStart(2, 4.0, 7), group=g) for g in ("shared", "late") for k in range(2)]
    replies = engine.train(1, jobs)
    assert [m.metadata.dst_node_id for m in grid.sent] == [100, 101, 100]
    assert [(r.group, r.client) for r in replies.replies] == [("shared", 0), ("late", 0)]
    assert replies.failures[("late", 1)] == flower.NOT_SENT
    assert "Node Unavailable" in replies.failures[("shared", 1)]


def test_a_round_with_no_supernode_online_sends_nothing(message_identity):
    grid = ScriptedGrid(lambda m: pytest.fail("nothing is to be sent"))
    nodes = SimpleNamespace(node_of={}, sizes=[5, 5], refresh=lambda timeout: None)
    engine = flower.FlowerEngine(grid, nodes, "", log=lambda m: None)
    replies = engine.train(1, [ClientJob(k, ClientStart(2, 4.0, 7), group="shared") for k in range(2)])
    no_node = {("shared", 0): flower.NO_NODE, ("shared", 1): flower.NO_NODE}
    assert (replies.replies, replies.failures, grid.timeouts) == ([], no_node, [])


# --- the ServerApp and ClientApp over a Grid in this process ---------------------------------------------------------


class LoopbackGrid(Grid):
    """A Grid whose SuperNodes are ClientApps called in this process; every record, and each node's state, is
    serialised and parsed back after every message, as between a SuperNode and its ClientApp processes."""

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
            context = self.contexts[m.metadata.dst_node_id]
            try:
                reply = self.app(delivered, context)
                reply = Message(metadata=reply.metadata, content=over_the_wire(reply.content))
            except Exception as e:  # what a SuperNode does with a ClientApp that raised
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            context.state = over_the_wire(context.state)
            self.received.append(delivered)
            self.replies[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture
def loopback(monkeypatch, tiny_models, message_identity):
    """``florist run --engine flower`` with Flower's simulation replaced by a LoopbackGrid; yields the grids used."""
    import flwr.simulation

    grids = []

    def run_simulation(server_app, client_app, num_supernodes, backend_config=None):
        grids.append(LoopbackGrid(client_app, num_supernodes))
        server_app(grids[-1], Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)
    return grids


@pytest.fixture
def plugin_methods():
    """Two methods of modes no built-in one has: a core R between shared factors, and a B kept on the client."""
    for m in (CoreMean(), LocalB()):
        register(m)
    yield
    for name in ("coremean", "localb"):
        unregister(name)


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
    ffa = [m.content.array_records["shared"] for m in messages if job_config(m.content)["group"] == "ffa"]
    assert ffa and all(key.endswith(".A") for shared in ffa for key in shared)  # FFA-LoRA's A is the shared factor


@pytest.mark.parametrize("scheme", ["merge", "reinit"])
def test_a_core_and_factors_kept_on_the_nodes_reproduce_the_in_process_engine(
    tmp_path, loopback, plugin_methods, scheme
):
    """R between shared factors travels alone; a client's kept B stays in its node's state (serialised between
    messages) and goes on from there, so the run is the in-process one's, where the engine keeps it, bit for bit."""
    args = (
        'federation.methods=["coremean","localb"]',
        f'federation.scheme="{scheme}"',
        "federation.rounds=2",
        "lora.ranks=[4]",  # both methods combine clients of one rank
    )
    inprocess = run(tmp_path, "inprocess", *args)
    over_flower = run(tmp_path, "flower", 'engine="flower"', *args)
    assert assert_same_runs(inprocess, over_flower) > 0
    messages = [m for m in loopback[0].received if m.metadata.message_type == "train"]
    local = [job_config(m.content) for m in messages if job_config(m.content)["group"] == "localb"]
    assert [c["keep-from"] for c in local] == [""] * 3 + ["localb"] * 3
    for context in loopback[0].contexts.values():  # every node holds its own B, and never sent it
        assert "florist.kept.localb" in context.state.array_records
    ups = {(line["round"], line["group"]): line["clients"] for line in traffic(over_flower)}
    modules = len(read_adapter(over_flower / "rounds" / "001" / "coremean")[0])
    assert [c["up"]["adapter"] for c in ups[(1, "coremean")]] == [modules * 4 * 4 * 4] * 3  # R alone: 4 × 4 float32


def test_under_merge_a_node_is_sent_each_base_update_once_so_traffic_is_flat_in_the_rounds(tmp_path, loopback):
    """Every node keeps the base updates it was sent (``context.state``, serialised between messages), so a round's
    message carries the newest global update only: the bytes down do not grow with the round, and the run is the
    in-process one's bit for bit. A node that sat rounds out is sent what it missed, and nothing more."""
    args = ('federation.methods=["flexlora","fedit"]', "federation.rounds=4", 'eval.questions="none"')
    inprocess = run(tmp_path, "inprocess", *args)
    over_flower = run(tmp_path, "flower", 'engine="flower"', *args)
    assert assert_same_runs(inprocess, over_flower) > 0
    down = {}
    for line in traffic(over_flower):
        for c in line["clients"]:
            down.setdefault((line["group"], c["client"]), []).append(c["down"])
    for (group, client), per_round in down.items():
        if group == "shared":
            continue
        assert [d["resent_state"] for d in per_round] == [0, 0, 0], (group, client)
        assert len({d["total"] for d in per_round}) == 1, (group, client)  # rounds 2-4: one update each
    for context in loopback[0].contexts.values():  # each node holds the three past rounds of both branches
        held = sorted(k for k in context.state.array_records if k.startswith("florist.base."))
        assert len(held) == 2 * 3 and {k.rsplit("/", 2)[1] for k in held} == {"001", "002", "003"}

    sampled = run(tmp_path, "sampled", 'engine="flower"', *args, "federation.clients_per_round=1")
    for line in traffic(sampled)[1:]:
        (c,) = line["clients"]
        r = line["round"]
        # a client that took part in round j holds rounds 1..j-1: it misses j..r-1, the newest counted as the adapter
        j = max([q for q in range(1, r) if c["client"] in _took_part(sampled, q)], default=1)
        assert (c["down"]["resent_state"] > 0) == (r - j >= 2), (r, c)
    # metrics.jsonl counts the same bytes: a round's result to its participants at once, the rest when fetched
    comm = {(x["round"], x["branch"]): x for x in map(json.loads, (sampled / "metrics.jsonl").read_text().splitlines())}
    for line in traffic(sampled):
        if line["group"] != "fedit":
            continue
        (c,) = line["clients"]
        r, k = line["round"], c["client"]
        mine = [q for q in range(1, r) if comm[(q, "fedit")]["participants"] == [k]]
        pushed = 0
        if mine:
            at = comm[(mine[-1], "fedit")]["communication"]
            pushed = at["download_params"][0] - (at["catchup_download_params"] or [0])[0]
        caught = (comm[(r, "fedit")]["communication"]["catchup_download_params"] or [0])[0]
        assert (caught > 0) == (comm[(r - 1, "fedit")]["participants"] != [k]), (r, k)
        assert c["down"]["adapter"] + c["down"]["resent_state"] == 4 * (pushed + caught), (r, k)


def _took_part(path: Path, round_number: int) -> list[int]:
    records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [k for r in records if r["round"] == round_number for k in r["participants"]]


def test_a_node_that_lost_its_state_is_sent_its_whole_base_in_the_same_round(tmp_path, loopback, monkeypatch):
    """A ClientApp whose node state is gone (as after a restart) answers that it does not hold its base; the server
    sends that job again with every update of the base, so the round goes on with the client and the run is the
    in-process one's bit for bit."""
    import florist.engines.flower_app as flower_app

    def forget_before_round_3(message, context, call_next):
        job = message.content.config_records.get("job")
        if message.metadata.message_type == "train" and job["round"] == 3 and context.node_config["partition-id"] == 1:
            for key in [k for k in context.state.array_records if k.startswith(flower_app.BASE_STATE_PREFIX)]:
                del context.state[key]
        return call_next(message, context)

    real = flower_app.client_app
    monkeypatch.setattr(
        flower_app, "client_app", lambda load_model=None, mods=(): real(load_model, [forget_before_round_3])
    )
    args = ('federation.methods=["fedit"]', "federation.rounds=3", 'eval.questions="none"')
    inprocess = run(tmp_path, "inprocess", *args)
    over_flower = run(tmp_path, "flower", 'engine="flower"', *args)
    assert assert_same_runs(inprocess, over_flower) > 0
    (last,) = [line for line in traffic(over_flower) if line["round"] == 3]
    by_client = {c["client"]: c for c in last["clients"]}
    assert all(c["status"] == "replied" for c in by_client.values())
    assert by_client[0]["down"]["resent_state"] == by_client[2]["down"]["resent_state"] == 0
    assert by_client[1]["down"]["resent_state"] > 0  # the refused message and the whole base, both counted


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


def test_the_traffic_record_keeps_the_whole_rounds_before_a_line_a_crash_cut_short(tmp_path):
    path = tmp_path / "flower_traffic.jsonl"
    whole = [{"round": 1, "group": "shared", "clients": []}, {"round": 2, "group": "shared", "clients": []}]
    path.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in whole) + b'{"round": 3, "gro')
    assert flower.TrafficLog(path, done=2).lines() == whole  # the torn third line is dropped, and the file rewritten
    assert path.read_text().count("\n") == 2
    assert flower.TrafficLog(path, done=1).lines() == whole[:1]  # lines of rounds that did not finish go too
    path.write_bytes(b'["not a record"]\n' + json.dumps(whole[0]).encode() + b"\n")
    assert flower.TrafficLog(path, done=2).lines() == []


# --- the florist strategy in a ServerApp of one's own ----------------------------------------------------------------

RANK, ALPHA = 4, 8.0  # the LoRA config of the flowertune-llm style apps below
PEFT_Q = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"


def peft_state(g, rank=RANK, layers=2, n=64, m=64):
    """A PEFT state dict of the tiny model's q_proj pairs, as ``get_peft_model_state_dict`` names them."""
    return {
        PEFT_Q.format(i, f): torch.randn(*((rank, n) if f == "A" else (m, rank)), generator=g)
        for i in range(layers)
        for f in "AB"
    }


class NodesGrid:
    """Just enough Grid for ``configure_train``: the nodes online."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def strategy_replies(messages, states, metrics=None):
    """Each message's reply, carrying the state dict given for it and ``num-examples`` 10 (or ``metrics``)."""
    return [
        Message(
            RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics or {"num-examples": 10})}),
            reply_to=m,
        )
        for m, state in zip(messages, states)
    ]


def global_update(arrays: ArrayRecord, module: int) -> torch.Tensor:
    """The update s·B·A a PEFT model of the clients' config holds after loading ``arrays``."""
    state = arrays.to_torch_state_dict()
    return (ALPHA / RANK) * state[PEFT_Q.format(module, "B")] @ state[PEFT_Q.format(module, "A")]


def sent_to(messages):
    """The messages with the ids a Grid gives them as it pushes them."""
    for k, m in enumerate(messages):
        m.metadata.__dict__["_message_id"] = f"train-{k}"
    return messages


def lora_update(state) -> ClientUpdate:
    """A PEFT state dict of the tiny q_proj pairs as florist's client update, at the apps' LoRA scaling."""
    modules = {
        f"model.layers.{i}.self_attn.q_proj": LoraFactors(
            A=state[PEFT_Q.format(i, "A")], B=state[PEFT_Q.format(i, "B")], scaling=ALPHA / RANK
        )
        for i in range(2)
    }
    return ClientUpdate(modules, 10)


@pytest.mark.parametrize(
    "method, value, rank",
    [("fedit", None, "equal"), ("florist", 0.1, "below"), ("florist", 1.0, "above"), ("flora", None, "above")],
)
def test_the_strategy_returns_the_methods_aggregate_at_the_clients_rank(method, value, rank, message_identity):
    """Below the clients' rank the aggregate is kept whole (fresh components padded in, B zero there); above it, its
    best rank-r approximation; either way the PEFT arrays hold it at rank r, with PEFT's scaling undone in B."""
    g = torch.Generator().manual_seed(0)
    initial = ArrayRecord(peft_state(g))
    strategy = FederatedLoRA(method, value, lora_alpha=ALPHA, min_train_nodes=3, min_available_nodes=3)
    messages = sent_to(
        list(strategy.configure_train(1, initial, ConfigRecord({"save_path": "x"}), NodesGrid([1, 2, 3])))
    )
    assert all(set(m.content) == {"arrays", "config"} and m.content["config"]["server-round"] == 1 for m in messages)
    states = [peft_state(g) for _ in messages]
    arrays, metrics = strategy.aggregate_train(1, strategy_replies(messages, states))
    assert list(arrays) == list(initial)  # the keys, in the order, the clients' PEFT models load
    assert all(arrays[k].shape == initial[k].shape for k in initial) and metrics["clients"] == 3
    expected = aggregate(method, [lora_update(s) for s in states], value=value).modules
    for i in range(2):
        exact = expected[f"model.layers.{i}.self_attn.q_proj"]
        got = global_update(arrays, i)
        assert {"equal": exact.rank == RANK, "below": exact.rank < RANK, "above": exact.rank > RANK}[rank]
        if exact.rank <= RANK:
            torch.testing.assert_close(got, exact.B @ exact.A, rtol=1e-4, atol=1e-5)
            assert not arrays.to_torch_state_dict()[PEFT_Q.format(i, "B")][:, exact.rank :].any()  # fresh components
        else:  # Eckart–Young: the top r singular components of the aggregate
            U, S, Vh = torch.linalg.svd((exact.B @ exact.A).double())
            torch.testing.assert_close(got.double(), U[:, :RANK] * S[:RANK] @ Vh[:RANK], rtol=1e-4, atol=1e-5)
    assert (metrics["energy-kept-min"] < 1) == (rank == "above")


def test_the_strategy_leaves_out_every_reply_it_cannot_trust_and_aggregates_the_rest(message_identity):
    g = torch.Generator().manual_seed(0)
    initial = ArrayRecord(peft_state(g))
    strategy = FederatedLoRA("fedit", lora_alpha=ALPHA, min_train_nodes=7, min_available_nodes=7, max_update_norm=1e3)
    messages = sent_to(list(strategy.configure_train(1, initial, ConfigRecord(), NodesGrid(range(1, 8)))))
    honest = peft_state(g)
    nan = {**peft_state(g), PEFT_Q.format(0, "A"): torch.full((RANK, 64), math.nan)}
    extra = {**peft_state(g), "base_model.model.lm_head.weight": torch.ones(2, 2)}
    huge = {**peft_state(g), PEFT_Q.format(1, "B"): torch.full((64, RANK), 1e6)}
    wider = {**peft_state(g), PEFT_Q.format(0, "A"): torch.ones(RANK, 32), PEFT_Q.format(0, "B"): torch.ones(64, RANK)}
    higher = peft_state(g, rank=RANK + 1)
    replies = strategy_replies(messages[:6], [honest, nan, extra, huge, wider, higher])
    replies.append(Message(Error(0, "Traceback:\n" + "z" * 5000), reply_to=messages[6]))
    replies.append(strategy_replies(messages[:1], [peft_state(g)])[0])  # a second reply to node 1's message
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert (metrics["clients"], metrics["left-out"]) == (1, 6)
    for k in initial:  # FedIT of the one honest client is that client's own adapter
        torch.testing.assert_close(arrays.to_torch_state_dict()[k], honest[k])
    no_weight = strategy_replies(messages[:1], [honest], metrics={"train_loss": 1.0})
    assert strategy.aggregate_train(1, no_weight) == (None, None)  # nothing passed: the global adapter stays


def test_the_strategy_refuses_what_it_cannot_run_in_one_line():
    with pytest.raises(ValueError, match="trains B; A shared and frozen; uploads B, but a flowertune-llm ClientApp"):
        FederatedLoRA("ffa", lora_alpha=ALPHA)
    with pytest.raises(ValueError, match="method 'fedit' has no swept parameter"):
        FederatedLoRA("fedit", 0.9, lora_alpha=ALPHA)
    with pytest.raises(ValueError, match="method 'fedex' adds a residual to every client's base weights"):
        FederatedLoRA("fedex", lora_alpha=ALPHA)
    for kept_or_core in ("fedsa", "fedsb", "rolora"):
        with pytest.raises(ValueError, match="but a flowertune-llm ClientApp trains and sends both A and B"):
            FederatedLoRA(kept_or_core, lora_alpha=ALPHA)
    FederatedLoRA("hetlora", lora_alpha=ALPHA)  # both factors, each round from the global adapter: FedAvg's shape
    with pytest.raises(ValueError, match="value 1.5 as τ must hold taus in"):
        FederatedLoRA("florist", 1.5, lora_alpha=ALPHA)
    with pytest.raises(ValueError, match="value is '0.9', not a number"):
        FederatedLoRA("florist", "0.9", lora_alpha=ALPHA)
    with pytest.raises(ValueError, match="lora_alpha"):
        FederatedLoRA("florist", lora_alpha=0)
    strategy = FederatedLoRA("florist", lora_alpha=ALPHA, min_train_nodes=1, min_available_nodes=1)
    with pytest.raises(ValueError, match="array base_model.model.lm_head.weight is not a lora_A/lora_B weight"):
        strategy.configure_train(
            1, ArrayRecord({"base_model.model.lm_head.weight": torch.ones(2, 2)}), ConfigRecord(), NodesGrid([1])
        )


# Written as Flower's flowertune-llm template writes its apps: the ServerApp builds the strategy and calls
# ``strategy.start``; the ClientApp loads the global adapter into its PEFT model, trains and replies arrays + metrics.


def template_model():
    model, _ = tiny_llama(0)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, config)


template_client = ClientApp()


@template_client.train()
def template_train(msg: Message, context: Context) -> Message:
    model = template_model()
    peft.set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    g = torch.Generator().manual_seed(
        int(context.node_config["partition-id"]) * 100 + msg.content["config"]["server-round"]
    )
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=g)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    arrays = ArrayRecord(peft.get_peft_model_state_dict(model))
    metrics = MetricRecord({"train_loss": float(loss), "num-examples": len(ids)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@pytest.mark.slow
def test_the_florist_strategy_runs_in_a_flowertune_style_app_on_flowers_simulation(tmp_path, monkeypatch):
    from flwr.simulation import run_simulation

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    runs = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord(peft.get_peft_model_state_dict(template_model()))
        strategy = FederatedLoRA("florist", 0.9, lora_alpha=ALPHA, fraction_evaluate=0.0)
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=2, timeout=600)
        runs.append((initial, result))

    run_simulation(server, template_client, num_supernodes=2, backend_config=copy.deepcopy(flower.SIMULATION_BACKEND))
    ((initial, result),) = runs
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(result.train_metrics_clientapp[r]["clients"] == 2 for r in (1, 2))
    final = result.arrays.to_torch_state_dict()
    start = initial.to_torch_state_dict()
    assert final.keys() == start.keys()
    for key, t in final.items():
        assert t.shape == start[key].shape and t.shape[0 if ".lora_A." in key else 1] == RANK
        assert torch.isfinite(t).all()
    assert any(not torch.equal(final[k], start[k]) for k in final if ".lora_B." in k)  # B starts at zero


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
    # round-1 global adapters as they go down in round 2 (the merged update the clients train on); a branch trains
    # in round 1 in the group of its method's mode, and from round 2 in its own
    records = {
        (r["round"], r["branch"]): r
        for r in (json.loads(x) for x in (inprocess / "metrics.jsonl").read_text().splitlines())
        if r["round"]
    }
    lines = {(line["round"], line["group"]): line["clients"] for line in traffic(tmp_path / "flower")}
    for (round_number, branch), record in records.items():
        mode = get_method(record["method"]).mode(1)
        group = branch if round_number > 1 else "shared" if mode == BOTH_FACTORS else record["method"]
        clients = lines[(round_number, group)]
        assert [c["up"]["adapter"] for c in clients] == record["communication"]["upload_bytes"]
        if round_number == 2:
            assert [c["down"]["adapter"] for c in clients] == records[(1, branch)]["communication"]["download_bytes"]
    assert {c["status"] for clients in lines.values() for c in clients} == {"replied"}


def test_on_flowers_simulation_a_node_with_jobs_in_two_groups_keeps_every_update_it_was_sent(
    tmp_path, tiny_models, one_thread, monkeypatch
):
    """One SuperNode, two branches: from round 2 it has a job in each branch's group. Flower's simulation runs two
    messages for one node on two workers from the same context, the later reply's state replacing the other's; sent
    one after another, the node keeps both branches' updates, and round 3 carries only round 2's."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    log = []
    cfg = load_config(
        None,
        FAST
        + [
            f'output="{tmp_path / "one"}"',
            'engine="flower"',
            "data.clients=1",
            "lora.ranks=[4]",
            'federation.methods=["fedit","flora"]',
            "federation.rounds=3",
            'eval.questions="none"',
            "eval.heldout_loss=false",
        ],
    )
    run_module.run(cfg, progress=False, log=log.append)
    assert not [line for line in log if "lost their base updates" in line]
    third = [c for line in traffic(tmp_path / "one") if line["round"] == 3 for c in line["clients"]]
    assert len(third) == 2 and all(c["status"] == "replied" and c["down"]["resent_state"] == 0 for c in third)


def _cut_reply(threshold: float):
    g = torch.Generator().manual_seed(0)
    job = ClientJob(1, ClientStart(4, 8.0, 7, upload_threshold=threshold), group="g")
    upload = ClientUpload(
        {n: {"A": torch.randn(4, k, generator=g), "B": torch.randn(m, 4, generator=g)} for n, (m, k) in SHAPES.items()},
        {n: 2.0 for n in SHAPES},
        5,
    )
    return job, cut_upload(upload, threshold)


def test_a_cut_upload_crosses_the_wire_with_its_spectra():
    job = read_job(over_the_wire(job_content(_cut_reply(0.6)[0], 1, "")))
    assert job.start.upload_threshold == 0.6
    job, upload = _cut_reply(0.6)
    reply = read_update(over_the_wire(update_content(job_config(job_content(job, 1, "")), upload, TrainingLog())), job)
    assert reply.upload.spectra.keys() == upload.factors.keys()
    for n, S in upload.spectra.items():
        assert torch.equal(reply.upload.spectra[n], S)
        assert all(torch.equal(reply.upload.factors[n][f], upload.factors[n][f]) for f in "AB")


@pytest.mark.parametrize(
    "change, refusal",
    [
        (lambda c: c.array_records.pop("spectra"), "sent no 'spectra' record"),
        (lambda c: c.array_records["spectra"].__setitem__("nope", Array(torch.ones(2).numpy())), "of no module"),
        (lambda c: c.array_records["spectra"].__delitem__(next(iter(SHAPES))), "no spectrum for module"),
    ],
)
def test_a_cut_reply_without_its_spectra_is_refused_in_one_line(change, refusal):
    job, upload = _cut_reply(0.6)
    content = update_content(job_config(job_content(job, 1, "")), upload, TrainingLog())
    change(content)
    with pytest.raises(MessageError, match=refusal):
        read_update(over_the_wire(content), job)


def test_a_whole_pair_reply_carrying_spectra_is_refused():
    job, upload = _cut_reply(1.0)
    upload.spectra.update({n: torch.ones(4) for n in SHAPES})
    with pytest.raises(MessageError, match="unexpected array record 'spectra'"):
        read_update(over_the_wire(update_content(job_config(job_content(job, 1, "")), upload, TrainingLog())), job)


def test_cut_uploads_over_flower_reproduce_the_in_process_engine_and_save_real_bytes(tmp_path, loopback):
    """The clients cut before they reply: the traffic record's upload bytes are the cut pairs and their spectra, as
    the run's accounting counts them, and the run is the in-process one bit for bit."""
    args = (
        'federation.methods=["florist","flora","fedit"]',
        "federation.rounds=2",
        'federation.upload_thresholds="0.5"',
    )
    inprocess = run(tmp_path, "inprocess", *args)
    over_flower = run(tmp_path, "flower", 'engine="flower"', *args)
    assert assert_same_runs(inprocess, over_flower) > 0
    records = [json.loads(x) for x in (over_flower / "metrics.jsonl").read_text().splitlines()]
    accounted = {(r["round"], r["branch"]): r["communication"]["upload_bytes"] for r in records if r["round"]}
    for line in traffic(over_flower):
        label = "flora+up0.50" if line["group"] == "shared" else line["group"]
        assert [c["up"]["total"] for c in line["clients"]] == accounted[(line["round"], label)], line["group"]
    # what was cut away was never sent: client 0 trains at rank 4 and sends fewer components in some module
    kept = [r["upload_ranks"][r["participants"].index(0)] for r in records if r["round"] and 0 in r["participants"]]
    assert kept and any(p < 4 for ranks in kept for p in ranks.values())
