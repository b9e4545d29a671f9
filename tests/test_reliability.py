"""Hostile and faulty clients, and a server that dies: every update is screened, failures are contained, and a
killed run resumes to exactly the adapters of a run that was never interrupted.

On both engines: clients that raise, hang past their time limit, or send updates that are malformed (rank above
the one asked for, NaN, wrong shapes, norms over the bound; on Flower also oversized replies and array headers
that lie). The in-process server is killed with SIGKILL (a subprocess running ``florist run``) in the middle of
writing a round and between rounds; the Flower server is stopped at the same two points. All on the tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity
from test_federation import TINY_RUN

import florist.engines.flower as flower
import florist.engines.flower_app as flower_app
import florist.run as run_module
import florist.setup as run_setup
from florist.adapters import read_adapter
from florist.aggregation import ClientUpdate, LoraFactors
from florist.client import LocalTrainer
from florist.config import load_config
from florist.engines.flower_messages import MessageError, job_config, job_content, read_update, update_content
from florist.jobs import ClientJob, ClientMode, ClientReply, ClientStart, ClientUpload, RoundReplies, TrainingLog
from florist.methods import aggregate
from florist.models import tiny_llama
from florist.rundir import RunDirectory
from florist.server import Federation, RoundFailed, RoundHooks, RoundSettings, TrainingGroup, UpdateChecks

FAST = [*TINY_RUN, "eval.limit=4", "lora.ranks=[4]", 'federation.thresholds="0.9"']
Q = "model.layers.0.self_attn.q_proj"  # a module of the tiny model, 64 x 64


def tiny(name, dtype, device):
    return tiny_llama(0)


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch):
    monkeypatch.setattr(run_setup, "load_model", tiny)  # the server's copy (and the in-process clients')
    monkeypatch.setattr(flower_app, "load_model", tiny)  # the Flower ClientApps'


def run(tmp_path, name, *overrides, **kw):
    cfg = load_config(None, FAST + [f'output="{tmp_path / name}"', *overrides])
    return run_module.run(cfg, progress=False, log=lambda m: None, **kw)


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()][1:]  # without round 0


def leftovers(path: Path) -> list[Path]:
    """Temporary names of interrupted atomic writes."""
    return sorted(p for p in path.rglob(".*") if p.name.endswith((".tmp", ".old")))


def assert_same_runs(a: Path, b: Path) -> int:
    """Every adapter (clients' and globals') bit for bit, and every metric but timings; returns the adapter count."""
    adapters = sorted(p.parent.relative_to(a) for p in a.rglob("adapter_model.safetensors"))
    assert adapters == sorted(p.parent.relative_to(b) for p in b.rglob("adapter_model.safetensors"))
    for rel in adapters:
        fa, fb = read_adapter(a / rel)[0], read_adapter(b / rel)[0]
        assert fa.keys() == fb.keys()
        for n in fa:
            assert torch.equal(fa[n].A, fb[n].A) and torch.equal(fa[n].B, fb[n].B), (rel, n)
    assert _untimed(records(a)) == _untimed(records(b))
    return len(adapters)


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in ("seconds", "server_seconds")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def global_of_accepted(path: Path, label: str, clients: list[int], method: str = "fedit") -> None:
    """The round's global adapter is the aggregate of the accepted clients' saved adapters alone."""
    r1 = path / "rounds" / "001"
    saved = sorted(int(p.name.removeprefix("client_")) for p in (r1 / "clients" / "shared").iterdir())
    assert saved == clients  # a rejected client's adapter is not kept
    updates = []
    for k in clients:
        factors, _ = read_adapter(r1 / "clients" / "shared" / f"client_{k}")
        info = json.loads((r1 / "clients" / "shared" / f"client_{k}" / "client.json").read_text())
        updates.append(ClientUpdate(factors, info["num_examples"], f"client {k}"))
    expected = aggregate(method, updates)
    got, _ = read_adapter(r1 / label)
    for n, m in expected.modules.items():
        torch.testing.assert_close(got[n].B @ got[n].A, m.B @ m.A, rtol=1e-5, atol=1e-7)


# --- tampering with an update ----------------------------------------------------------------------------------------


def tampered_upload(upload: ClientUpload, name: str, tamper) -> ClientUpload:
    """``upload`` with ``tamper``'s changes to module ``name``'s factors (``tamper`` takes the module's pair)."""
    held = upload.factors[name]
    changes = tamper(LoraFactors(A=held["A"], B=held["B"], scaling=upload.scalings[name]))
    return ClientUpload({**upload.factors, name: {**held, **changes}}, upload.scalings, upload.num_examples)


def nan_in_b(f: LoraFactors) -> dict:
    B = f.B.clone()
    B[0, 0] = float("nan")
    return {"B": B}


TAMPER = {  # what a hostile client does to module Q of its honest update, and what the server says about it
    "rank above the one asked for": (
        lambda f: {"A": torch.cat([f.A, f.A]), "B": torch.cat([f.B, f.B], dim=1)},
        f"client {{k}}, module {Q}: rank 8 exceeds the bound 4",
    ),
    "NaN": (nan_in_b, f"client {{k}}, module {Q}: B contains NaN or Inf"),
    "a weight of another shape": (
        lambda f: {"A": f.A[:, :32].clone()},
        f"client {{k}}, module {Q}: adapts a 64x32 weight, the base model 64x64",
    ),
    "an update over the norm bound": (lambda f: {"B": f.B * 1e4}, f"client {{k}}, module {Q}: update norm"),
}


def test_hostile_updates_are_rejected_and_the_round_goes_on_in_process(tmp_path, monkeypatch):
    hostile = dict(enumerate(TAMPER, start=1))  # clients 1..4; clients 0 and 5 are honest
    real = LocalTrainer.train

    def tampered(self, examples, start, client_id="", on_step=None, kept=None):
        upload, log, kept = real(self, examples, start, client_id, on_step, kept)
        k = int(client_id.split()[-1])
        if k in hostile:
            upload = tampered_upload(upload, Q, TAMPER[hostile[k]][0])
        return upload, log, kept

    monkeypatch.setattr(LocalTrainer, "train", tampered)
    args = (
        'federation.methods=["fedit"]',
        "data.clients=6",
        "federation.min_clients=2",
        "federation.max_update_norm=100",
    )
    path = run(tmp_path, "r", *args)
    (record,) = records(path)
    assert record["participants"] == [0, 5]
    assert set(record["rejected"]) == {"1", "2", "3", "4"}
    for k, name in hostile.items():
        assert record["rejected"][str(k)].startswith(TAMPER[name][1].format(k=k)), record["rejected"][str(k)]
    global_of_accepted(path, "fedit", [0, 5])

    # the same round with fewer good clients than min_clients fails before writing anything, and can be resumed
    with pytest.raises(
        RoundFailed,
        match=r"6 of 6 clients replied for shared and 2 updates passed the checks, fewer than min_clients=3",
    ):
        run(tmp_path, "strict", *args, "federation.min_clients=3")
    strict = tmp_path / "strict"
    assert not (strict / "state.json").exists() and not (strict / "rounds").exists()
    assert [json.loads(x)["round"] for x in (strict / "metrics.jsonl").read_text().splitlines()] == [0]
    monkeypatch.setattr(LocalTrainer, "train", real)
    resumed = run(tmp_path, "strict", *args, "federation.min_clients=3")
    assert [json.loads(x)["round"] for x in (resumed / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert records(resumed)[0]["participants"] == list(range(6)) and records(resumed)[0]["rejected"] == {}


def test_a_client_that_raises_or_overruns_its_time_is_left_out_in_process(tmp_path, monkeypatch):
    real = LocalTrainer.train
    hung = threading.Event()

    def faulty(self, examples, start, client_id="", on_step=None, kept=None):
        if client_id == "client 1":
            raise RuntimeError("disk full")
        # every optimizer step takes longer than the client's whole time limit; the limit leaves the honest clients
        # (a few seconds of training each) ample room on a loaded machine
        if client_id == "client 2":

            def slow_step(*args):
                hung.set()
                time.sleep(13)
                on_step(*args)

            return real(self, examples, start, client_id, slow_step, kept)
        return real(self, examples, start, client_id, on_step, kept)

    monkeypatch.setattr(LocalTrainer, "train", faulty)
    path = run(
        tmp_path, "r", 'federation.methods=["fedit","florist"]', "data.clients=4", "federation.client_timeout=12"
    )
    assert hung.is_set()
    for record in records(path):
        assert record["participants"] == [0, 3], record["rejected"]
        assert record["rejected"]["1"] == "RuntimeError: disk full"
        assert record["rejected"]["2"].startswith("ClientTimeout: still training after 12 s (step 1 of ")
    global_of_accepted(path, "fedit", [0, 3])


# --- the in-process server killed with SIGKILL -----------------------------------------------------------------------

KILLABLE = '''
"""``florist run`` on the tiny test model, holding still at one point for the test to kill it there."""

import json
import os
import sys
import time
from pathlib import Path

import florist.setup as run_setup
from florist.models import tiny_llama
from florist.server import Federation

run_setup.load_model = lambda name, dtype, device: tiny_llama(0)
hold_at, args = sys.argv[1], sys.argv[2:]
where, _, n = hold_at.rpartition("-")

if where == "writing-state":  # round n's adapters and metrics are written; its state.json is a temporary file
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst).name == "state.json" and json.loads(Path(src).read_text())["completed_rounds"] == int(n):
            time.sleep(3600)
        return real_replace(src, dst, *a, **kw)

    os.replace = replace
elif where == "before-round":  # the rounds before n are finished and saved; round n has not begun
    real_run_round = Federation.run_round

    def run_round(self, round_number):
        if round_number == int(n):
            time.sleep(3600)
        return real_run_round(self, round_number)

    Federation.run_round = run_round

from florist.cli import app

app(args, prog_name="florist")
'''


def completed_rounds(path: Path) -> int:
    try:
        return json.loads((path / "state.json").read_text())["completed_rounds"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def wait_for(condition, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"florist run exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


class Florist:
    """``florist run`` in a subprocess (tiny model, one thread), to be killed with SIGKILL where the test says."""

    def __init__(self, tmp_path: Path, overrides: list[str]):
        self.script = tmp_path / "florist_tiny.py"
        self.script.write_text(KILLABLE)
        self.overrides = overrides
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def command(self, hold_at: str, output: Path) -> list[str]:
        sets = [x for o in self.overrides for x in ("--set", o)]
        return [sys.executable, str(self.script), hold_at, "run", "--quiet", "--output", str(output), *sets]

    def finish(self, output: Path) -> None:
        done = subprocess.run(
            self.command("nowhere", output), env=self.env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    def kill_at(self, hold_at: str, output: Path, reached, timeout: float = 400) -> None:
        process = subprocess.Popen(
            self.command(hold_at, output), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for(lambda: reached(output), process, timeout, f"the run to reach {hold_at}")
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=60)


@pytest.mark.slow  # four runs in fresh processes: about two minutes on two cores
def test_a_server_killed_mid_write_and_between_rounds_resumes_to_the_same_adapters(tmp_path):
    florist = Florist(tmp_path, FAST + ['federation.methods=["florist","fedit"]', "federation.rounds=2"])
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    florist.finish(whole)

    # SIGKILL while round 1's state.json is being written: its adapters and metrics are on disk, the round is not
    florist.kill_at("writing-state-1", killed, lambda p: any(p.glob(".state.json.*.tmp")))
    assert completed_rounds(killed) == 0 and (killed / "rounds" / "001").exists()
    assert {r["round"] for r in records(killed)} == {1}  # metrics ahead of state.json: dropped on resume
    assert leftovers(killed)

    # resumed: round 1 is run again from scratch; SIGKILL once it is saved, before round 2 begins
    florist.kill_at("before-round-2", killed, lambda p: completed_rounds(p) == 1)
    assert not (killed / "rounds" / "002").exists()

    florist.finish(killed)
    assert completed_rounds(killed) == 2
    # round 1: 3 clients trained once for both branches, 2 globals; round 2: each branch trains its own 3 clients
    assert assert_same_runs(whole, killed) == (3 + 2) + (2 * 3 + 2)
    assert [json.loads(x)["round"] for x in (killed / "metrics.jsonl").read_text().splitlines()] == [0, 1, 1, 2, 2]
    assert leftovers(killed) == [] and leftovers(whole) == []
    assert (killed / "results.md").read_text().replace(str(killed), "") == (whole / "results.md").read_text().replace(
        str(whole), ""
    )


def test_resume_removes_what_a_kill_left_half_written(tmp_path):
    """Whatever a kill cut short (a temporary file, an unfinished round, metrics ahead of the state) is dropped."""
    path = run(tmp_path, "r", 'federation.methods=["fedit"]', 'eval.questions="none"')
    (path / ".metrics.jsonl.x1y2z3w4.tmp").write_text("half a line")  # the names atomic writes give
    (path / "rounds" / "001" / "clients" / "shared" / ".client_0.ab12cd34.tmp").mkdir()
    (path / "rounds" / "002" / "clients" / "shared" / ".client_0.ab12cd34.tmp").mkdir(parents=True)
    with (path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"round": 2, "branch": "fedit"}) + "\n")
    cfg = load_config(None, FAST + [f'output="{path}"', 'federation.methods=["fedit"]', 'eval.questions="none"'])
    assert RunDirectory(path, None).open(cfg.to_toml()) == 1
    assert leftovers(path) == [] and not (path / "rounds" / "002").exists()
    assert [r["round"] for r in records(path)] == [1]


# --- Flower: a Grid whose SuperNodes answer from threads -------------------------------------------------------------


def over_the_wire(content: RecordDict) -> RecordDict:
    """Serialise a record dict as Flower does for transport and parse it back."""
    objects = get_all_nested_objects(content)
    return inflate_object_from_contents(content.object_id, {i: o.deflate() for i, o in objects.items()})


class ThreadedGrid(Grid):
    """A Grid whose SuperNodes are ClientApps called in threads of this process, every record serialised both ways.

    A reply arrives when its ClientApp returns, so a ClientApp that never returns is a client that never answers.
    """

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
        self.lock = threading.Lock()

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
            threading.Thread(target=self._deliver, args=(m,), daemon=True).start()
            ids.append(m.metadata.message_id)
        return ids

    def _deliver(self, m: Message) -> None:
        delivered = Message(metadata=m.metadata, content=over_the_wire(m.content))
        try:
            reply = self.app(delivered, self.contexts[m.metadata.dst_node_id])
            reply = Message(metadata=reply.metadata, content=over_the_wire(reply.content))
        except Exception as e:  # what a SuperNode does with a ClientApp that raised
            reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
        with self.lock:
            self.replies[m.metadata.message_id] = reply

    def pull_messages(self, message_ids):
        with self.lock:
            return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        """Push, then pull until every message is answered or ``timeout`` s have passed, as Flower's grids do."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        while pending and (deadline is None or time.monotonic() < deadline):
            got = self.pull_messages(pending)
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            time.sleep(0.05)
        return replies


_training = threading.Lock()


def one_at_a_time(message, context, call_next):
    """The ClientApps of one process share one model: they train in turn (a stalled one holds nothing)."""
    with _training:
        return call_next(message, context)


@pytest.fixture
def flower_run(monkeypatch):
    """``florist run --engine flower`` over a ThreadedGrid; the test puts its Flower mods in the returned list."""
    import flwr.simulation

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what the simulation sets for the ServerApp's messages
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    mods: list = []
    real = flower_app.client_app
    monkeypatch.setattr(
        flower_app, "client_app", lambda load_model=None, mods_=(): real(load_model, [*mods, one_at_a_time])
    )

    def run_simulation(server_app, client_app, num_supernodes, backend_config=None):
        server_app(
            ThreadedGrid(client_app, num_supernodes),
            Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        )

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)
    return mods


def traffic_status(path: Path) -> dict[tuple[int, int], str]:
    lines = [json.loads(x) for x in (path / flower.TRAFFIC_FILE).read_text().splitlines()]
    return {(t["round"], c["client"]): c["status"] for t in lines for c in t["clients"]}


def npy_claiming(shape: tuple[int, ...], payload: bytes) -> Array:
    """An array whose .npy header claims ``shape`` (float32) over whatever bytes follow."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload
    return Array(dtype="<f4", shape=tuple(shape), stype="numpy.ndarray", data=data)


def tamper_reply(change):
    """A Flower mod: the client's honest reply, with ``change(content)`` applied to it."""

    def mod(message, context, call_next):
        reply = call_next(message, context)
        if message.metadata.message_type == "train" and not reply.has_error():
            change(reply.content, context.node_config["partition-id"])
        return reply

    return mod


def test_hostile_replies_are_rejected_and_the_round_goes_on_over_flower(tmp_path, flower_run):
    hostile = dict(enumerate(TAMPER, start=1))  # clients 1..4 tamper with their factors; 5 and 6 with the message

    def change(content, k):
        record = content.array_records["update"]
        if k in hostile:
            f = LoraFactors(A=torch.from_numpy(record[f"{Q}.A"].numpy()), B=torch.from_numpy(record[f"{Q}.B"].numpy()))
            for factor, t in TAMPER[hostile[k]][0](f).items():
                record[f"{Q}.{factor}"] = Array(np.ascontiguousarray(t.numpy()))
        elif k == 5:  # pads its reply past federation.max_update_bytes
            record["padding"] = Array(np.zeros(300_000, dtype=np.float32))
        elif k == 6:  # an array whose header claims 10^12 elements
            record[f"{Q}.B"] = npy_claiming((10**6, 10**6), bytes(64))

    flower_run.append(tamper_reply(change))
    path = run(
        tmp_path,
        "r",
        'engine="flower"',
        'federation.methods=["fedit"]',
        "data.clients=8",
        "federation.min_clients=2",
        "federation.max_update_norm=100",
        "federation.max_update_bytes=1000000",
    )
    (record,) = records(path)
    assert record["participants"] == [0, 7]
    for k, name in hostile.items():
        assert record["rejected"][str(k)].startswith(TAMPER[name][1].format(k=k)), record["rejected"][str(k)]
    assert (
        "its arrays hold 12" in record["rejected"]["5"]
        and "over federation.max_update_bytes=1000000" in record["rejected"]["5"]
    )
    assert "its header claims shape (1000000, 1000000)" in record["rejected"]["6"]
    status = traffic_status(path)
    assert status[(1, 0)] == status[(1, 7)] == "replied" and status[(1, 5)].startswith("error: ")
    global_of_accepted(path, "fedit", [0, 7])


def test_a_failing_and_a_hanging_client_are_left_out_over_flower(tmp_path, flower_run):
    release = threading.Event()

    def faulty(message, context, call_next):
        if message.metadata.message_type == "train":
            if context.node_config["partition-id"] == 1:
                raise RuntimeError("disk full")
            if context.node_config["partition-id"] == 2:
                release.wait(300)  # hangs past the round's time limit (until the test ends)
                raise RuntimeError("too late")
        return call_next(message, context)

    flower_run.append(faulty)
    try:
        path = run(
            tmp_path,
            "r",
            'engine="flower"',
            'federation.methods=["fedit"]',
            "data.clients=4",
            "federation.client_timeout=10",
        )
    finally:
        release.set()
    (record,) = records(path)
    assert record["participants"] == [0, 3], record["rejected"]
    assert record["rejected"] == {"1": "error: RuntimeError: disk full", "2": flower.NO_REPLY}
    global_of_accepted(path, "fedit", [0, 3])


class Killed(BaseException):
    """The server process dying, short of a real kill."""


def test_a_flower_server_stopped_mid_write_and_between_rounds_resumes_to_the_same_adapters(
    tmp_path, flower_run, monkeypatch
):
    args = ('engine="flower"', 'federation.methods=["florist","fedit"]', "federation.rounds=2")
    whole = run(tmp_path, "whole", *args)

    real_append = RunDirectory.append_metrics

    def dies_writing_round_1(self, lines):
        if any(r.round == 1 for r in lines):  # round 1's adapters and traffic are on disk, its metrics and state not
            raise Killed
        return real_append(self, lines)

    monkeypatch.setattr(RunDirectory, "append_metrics", dies_writing_round_1)
    with pytest.raises(Killed):
        run(tmp_path, "stopped", *args)
    stopped = tmp_path / "stopped"
    assert completed_rounds(stopped) == 0 and (stopped / "rounds" / "001").exists()
    monkeypatch.setattr(RunDirectory, "append_metrics", real_append)

    real_train = flower.FlowerEngine.train

    def dies_before_round_2(self, round_number, jobs):
        if round_number == 2:  # before any of round 2's messages is sent
            raise Killed
        return real_train(self, round_number, jobs)

    monkeypatch.setattr(flower.FlowerEngine, "train", dies_before_round_2)
    with pytest.raises(Killed):
        run(tmp_path, "stopped", *args)
    assert completed_rounds(stopped) == 1
    monkeypatch.setattr(flower.FlowerEngine, "train", real_train)

    run(tmp_path, "stopped", *args)
    assert assert_same_runs(whole, stopped) == (3 + 2) + (2 * 3 + 2)
    assert (stopped / flower.TRAFFIC_FILE).read_text() == (whole / flower.TRAFFIC_FILE).read_text()
    assert [json.loads(x)["round"] for x in (stopped / "metrics.jsonl").read_text().splitlines()] == [0, 1, 1, 2, 2]
    assert leftovers(stopped) == []


# --- reading a reply -------------------------------------------------------------------------------------------------


FROZEN_A = ClientMode(trains={"B"}, shared={"A"})  # FFA-LoRA's mode


def taken_by_the_server(job: ClientJob, reply: ClientReply) -> ClientUpdate:
    """The update the server takes from ``reply``: completed from what ``job`` was sent, then screened."""
    server = Federation(
        None,
        [],
        RoundSettings(ranks=[2, 2], alpha_per_rank=2.0, scheme="merge", seed=0),
        UpdateChecks({Q: (64, 64)}),
        RoundHooks(log=lambda message: None),
    )
    screened = server.screen(1, TrainingGroup(job.group, [], [job]), RoundReplies([reply]))
    assert screened.rejected == {}, screened.rejected
    return screened.accepted[0].update


def test_under_ffa_the_server_keeps_its_own_a_whatever_the_reply_holds():
    frozen = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    job = ClientJob(1, ClientStart(2, 4.0, 7, mode=FROZEN_A, shared={Q: {"A": frozen}}))
    forged = ClientUpload({Q: {"A": torch.ones(2, 64), "B": torch.ones(64, 2)}}, {Q: 2.0}, 5)
    content = update_content(job_config(job_content(job, 1, "")), forged, TrainingLog())  # A included
    assert f"{Q}.A" in content.array_records["update"]
    with pytest.raises(MessageError, match=rf"array '{Q}\.A' is none of the factors its mode uploads \(B per module\)"):
        read_update(over_the_wire(content), job)
    # the server's A, whatever else an upload holds: a B-only reply over Flower, a forged A in process
    honest = ClientUpload({Q: {"B": torch.ones(64, 2)}}, {Q: 2.0}, 5)
    content = update_content(job_config(job_content(job, 1, "")), honest, TrainingLog())
    for reply in (read_update(over_the_wire(content), job), ClientReply(1, forged, TrainingLog())):
        pair = taken_by_the_server(job, reply).modules[Q]
        assert torch.equal(pair.A, frozen[:2]) and torch.equal(pair.B, torch.ones(64, 2))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.config_records["meta"].__setitem__("scalings", [1.0, 2.0]), "module names"),
        (
            lambda c: c.config_records["meta"].__setitem__("num-examples", "many"),
            "num-examples is 'many', not an integer",
        ),
        (lambda c: c.config_records["meta"].__delitem__("losses"), "no 'losses'"),
        (
            lambda c: c.array_records["update"].__setitem__(f"{Q}.B", Array(np.zeros((64, 2), dtype=np.int64))),
            "dtype int64",
        ),
        (lambda c: c.array_records["update"].__setitem__(f"{Q}.B", npy_claiming((64, 2), bytes(16))), "do not hold"),
        (
            lambda c: c.array_records["update"].__setitem__(
                f"{Q}.A", Array(dtype="<f4", shape=(2, 64), stype="numpy.ndarray", data=b"not an npy")
            ),
            "not a readable .npy",
        ),
    ],
)
def test_a_malformed_reply_is_one_message_error(change, message):
    job = ClientJob(1, ClientStart(2, 4.0, 7))
    upload = ClientUpload({Q: {"A": torch.ones(2, 64), "B": torch.ones(64, 2)}}, {Q: 2.0}, 5)
    content = update_content(job_config(job_content(job, 1, "")), upload, TrainingLog(losses=[1.0]))
    change(content)
    with pytest.raises(MessageError, match=message):
        read_update(content, job)
