"""florist on a real Flower deployment, on loopback: a SuperLink with TLS and SuperNode authentication, one
SuperNode process per client, ``flwr run`` submitting florist's ServerApp and ClientApp. Beside FedIT the run holds
a method whose clients keep B between rounds: a SuperNode starts a fresh ClientApp process for every message, and
the kept B must reach the next round's process through the node's ``context.state``.

Slow (minutes: every Flower message starts a ClientApp process that imports torch), bounded: every wait has a
timeout, and every process the tests start, with its children, is stopped by its id at the end.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

pytestmark = pytest.mark.slow

CLIENTS = 3
SIZES = [5, 6, 7]  # examples per client: each SuperNode reports (and trains on) its own file's
CONNECTION = "florist-test"
BIN = Path(sys.executable).parent


# --- certificates and keys -------------------------------------------------------------------------------------------


def write_tls(directory: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1, signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "florist test CA")])

    def certificate(subject, public_key, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256())

    ca = certificate(ca_name, ca_key.public_key(), [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server = certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]),
        key.public_key(),
        [(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)],
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def write_node_key(directory: Path, name: str) -> Path:
    """A SuperNode's P-384 key pair in OpenSSH format, as ``flower-supernode`` and ``flwr supernode register``
    read it.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = directory / name
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    (directory / f"{name}.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private


# --- processes -------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process this test started and every process it started (Flower detaches some), by their ids."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


class Federation:
    """A SuperLink and its SuperNodes on 127.0.0.1, and the ``flwr`` CLI configured for them."""

    def __init__(self, root: Path):
        self.root, self.pki, self.logs = root, root / "pki", root / "logs"
        for d in (self.pki, self.logs):
            d.mkdir(parents=True)
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        self.nodes: dict[int, subprocess.Popen] = {}
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(root / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        (root / "flwr-home").mkdir()
        (root / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.pki / "ca.crt"}"\n'
        )

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )

    def start_superlink(self) -> None:
        self.start(
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile",
                str(self.pki / "ca.crt"),
                "--ssl-certfile",
                str(self.pki / "server.pem"),
                "--ssl-keyfile",
                str(self.pki / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
        )
        wait_for(lambda: "Uvicorn running on https://" in self.log("superlink"), 120, "the SuperLink to listen")

    def start_supernode(self, name: str, key: Path, node_config: str) -> subprocess.Popen:
        return self.start(
            name,
            [
                "flower-supernode",
                "--root-certificates",
                str(self.pki / "ca.crt"),
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--auth-supernode-private-key",
                str(key),
                "--node-config",
                node_config,
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--max-retries",
                "3",
            ],
        )

    def online_nodes(self) -> list[dict]:
        listing = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        nodes = (
            json.loads(listing.stdout[listing.stdout.index("{") :]).get("nodes", []) if "{" in listing.stdout else []
        )
        return [n for n in nodes if n.get("status") == "online"]

    def stop_all(self) -> None:
        for p in reversed(self.processes):
            stop(p)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink (TLS, SuperNode authentication) and one registered SuperNode per client; client 2's ClientApp
    stalls in training (a Flower mod of the test app) so that it can be killed mid-round."""
    fed = Federation(tmp_path_factory.mktemp("deployment"))
    try:
        write_tls(fed.pki)
        fed.start_superlink()
        for k in range(CLIENTS):
            key = write_node_key(fed.pki, f"node{k}")
            registered = fed.flwr("supernode", "register", str(fed.pki / f"node{k}.pub"), CONNECTION)
            assert "registered successfully" in registered.stdout, registered.stdout + registered.stderr
            config = f'partition-id={k} num-partitions={CLIENTS} kept-log="{fed.root / "kept.jsonl"}"'
            if k == 2:
                config += f' stall-marker="{fed.root / "client-2-training"}"'
            fed.nodes[k] = fed.start_supernode(f"node{k}", key, config)
        wait_for(lambda: len(fed.online_nodes()) == CLIENTS, 180, "the SuperNodes to come online", interval=3)
        yield fed
    finally:
        fed.stop_all()


# --- the app under test ----------------------------------------------------------------------------------------------

APP_MODULE = '''
"""florist's ServerApp and ClientApp on a tiny random model, with a method whose clients keep B; client 2 stalls in
training when its node says so, and every node notes which kept factors its state holds at each job."""

import json
import time
from pathlib import Path

from florist.aggregation import AggregationResult, ModuleAggregate
from florist.aggregation.base import zero_pad
from florist.engines.flower_app import client_app, server_app
from florist.jobs import ClientMode
from florist.methods import Method, register
from florist.models import tiny_llama


class LocalB(Method):
    name = "localb"
    display = "Local-B"
    summary = "Averages A; every client keeps its own B."

    def mode(self, round_number):
        return ClientMode(trains={"A", "B"}, keeps={"B"})

    def aggregate(self, updates, weights, value=None):
        modules = {}
        for name in updates[0].modules:
            rank = max(u.modules[name].rank for u in updates)
            A = sum(w * zero_pad(u.modules[name].A, rank, dim=0) for u, w in zip(updates, weights))
            modules[name] = ModuleAggregate(A=A, B=A.new_zeros(updates[0].modules[name].B.shape[0], rank))
        return AggregationResult(self.name, modules, weights=list(weights))


register(LocalB())


def tiny(name, dtype, device):
    return tiny_llama(0)


def stall_when_told(message, context, call_next):
    marker = context.node_config.get("stall-marker")
    if marker and message.metadata.message_type == "train":
        Path(marker).write_text("training")
        time.sleep(3600)
    return call_next(message, context)


def note_kept_state(message, context, call_next):
    if message.metadata.message_type == "train":
        job = message.content.config_records["job"]
        held = sorted(k for k in context.state.array_records if k.startswith("florist.kept."))
        note = {"client": job["client"], "round": job["round"], "group": job["group"], "held": held}
        with open(context.node_config["kept-log"], "a") as log:
            log.write(json.dumps(note) + "\\n")
    return call_next(message, context)


server = server_app(load_model=tiny)
client = client_app(load_model=tiny, mods=[stall_when_told, note_kept_state])
'''

APP_PYPROJECT = """
[project]
name = "florist-deployment-test"
version = "1.0.0"
description = "florist on a Flower deployment, with a tiny model"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "florist"

[tool.flwr.app.components]
serverapp = "tiny_app:server"
clientapp = "tiny_app:client"

[tool.flwr.app.config]
config = ""
overwrite = false
round-timeout = 300.0
node-wait = 180.0
"""


def write_app(root: Path) -> tuple[Path, Path]:
    """The Flower app directory and the florist config it runs; each client's data is a file of its own."""
    app = root / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(APP_PYPROJECT)
    (app / "tiny_app.py").write_text(APP_MODULE)
    data = root / "data"
    data.mkdir()
    for k, n in enumerate(SIZES):
        rows = [
            {"instruction": f"Which client holds fact {i}?", "input": "", "output": f"Client {k} holds fact {i}."}
            for i in range(n)
        ]
        (data / f"client_{k}.json").write_text(json.dumps(rows))
    config = root / "run.toml"
    config.write_text(f'''
seed = 0
output = "{root / "run"}"

[data]
train = "{data}"
clients = {CLIENTS}
cutoff = 32

[lora]
ranks = [4, 2, 2]

[train]
batch_size = 4
micro_batch_size = 2
lr = 0.01

[federation]
rounds = 2
methods = ["fedit", "localb"]
min_clients = 2

[eval]
questions = "none"
heldout_loss = false
''')
    return app, config


# --- the tests -------------------------------------------------------------------------------------------------------


def test_the_superlink_serves_tls_with_its_own_certificate_only(federation):
    trusted = ssl.create_default_context(cafile=str(federation.pki / "ca.crt"))
    with socket.create_connection(("127.0.0.1", federation.port), timeout=10) as raw:
        with trusted.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            names = tls.getpeercert()["subjectAltName"]
    assert ("IP Address", "127.0.0.1") in names
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust this CA refuses the link
        with socket.create_connection(("127.0.0.1", federation.port), timeout=10) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", federation.port), timeout=10) as raw:  # plain HTTP gets no answer
        raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw.settimeout(10)
        try:
            answer = raw.recv(1024)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert not answer.startswith(b"HTTP/")


def test_an_unregistered_supernode_is_refused(federation):
    key = write_node_key(federation.pki, "stranger")
    stranger = federation.start_supernode("stranger", key, f"partition-id=0 num-partitions={CLIENTS}")
    code = stranger.wait(timeout=180)
    assert code != 0
    assert "No SuperNode found with the given public key" in federation.log("superlink")
    assert len(federation.online_nodes()) == CLIENTS


def test_a_supernode_killed_mid_round_leaves_the_round_to_the_others(federation):
    app, config = write_app(federation.root)
    began = time.monotonic()
    submitted = federation.flwr("run", str(app), CONNECTION, "--run-config", f'config="{config}"', "--format", "json")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = json.loads(submitted.stdout[submitted.stdout.index("{") :])["run-id"]

    # client 2's ClientApp has its round-1 job and stalls; its SuperNode dies with it
    wait_for(lambda: (federation.root / "client-2-training").exists(), 400, "client 2 to start training")
    stop(federation.nodes[2], grace=0)

    def finished():
        listing = federation.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        runs = json.loads(listing.stdout[listing.stdout.index("{") :]).get("runs", []) if "{" in listing.stdout else []
        return runs[0]["status"] if runs and runs[0]["status"].startswith("finished") else None

    status = wait_for(finished, 600, "the run to finish", interval=5)
    print(f"deployment run {run_id}: {status} after {time.monotonic() - began:.0f} s")
    logs = federation.flwr("log", str(run_id), CONNECTION, "--show", timeout=60).stdout
    assert status == "finished:completed", logs

    run_dir = federation.root / "run"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    took_part = {(r["round"], r["branch"]): r["participants"] for r in records}
    assert took_part == {(n, b): [0, 1] for n in (1, 2) for b in ("fedit", "localb")}  # who took part, round by round
    traffic = [json.loads(x) for x in (run_dir / "flower_traffic.jsonl").read_text().splitlines()]
    status_of = {(t["round"], t["group"], c["client"]): c["status"] for t in traffic for c in t["clients"]}
    groups = {1: ("shared", "localb"), 2: ("fedit", "localb")}
    assert all(status_of[(n, g, k)] == "replied" for n in (1, 2) for g in groups[n] for k in (0, 1)), status_of
    # Flower answers the dead node's message with an error once its heartbeats stop, well before the round timeout
    assert "Node Unavailable" in status_of[(1, "shared", 2)], status_of[(1, "shared", 2)]
    assert status_of[(1, "localb", 2)] != "replied"
    assert status_of[(2, "fedit", 2)] == status_of[(2, "localb", 2)] == "no SuperNode online for this client"
    # a client's kept B went from its round-1 ClientApp process to its round-2 one through the node's state
    notes = [json.loads(x) for x in (federation.root / "kept.jsonl").read_text().splitlines()]
    held = {(n["round"], n["client"]): n["held"] for n in notes if n["group"] == "localb"}
    assert held[(1, 0)] == held[(1, 1)] == [] and held[(2, 0)] == held[(2, 1)] == ["florist.kept.localb"], notes
    # each SuperNode trained on its own client's file
    for k in (0, 1):
        info = json.loads(
            (run_dir / "rounds" / "001" / "clients" / "shared" / f"client_{k}" / "client.json").read_text()
        )
        assert info["num_examples"] == SIZES[k]
    assert (run_dir / "results.md").exists()
