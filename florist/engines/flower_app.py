"""florist's ServerApp and ClientApp for Flower deployments (``flwr run``), and the ClientApp of the simulation.

    [tool.flwr.app.components]
    serverapp = "florist.engines.flower_app:server"
    clientapp = "florist.engines.flower_app:client"

The ClientApp trains one client: the SuperNode's ``partition-id`` (node config) says which, and the node reads
that client's data only. Every training message carries the run's config, so a ClientApp process needs nothing
but the message, its node config and the node's state; it keeps the model and its examples between messages.
The factors a client keeps between rounds (``ClientMode.keeps``) stay on its node, in Flower's ``context.state``,
and never travel.

The ServerApp reads from the run config (``[tool.flwr.app.config]`` or ``flwr run --run-config``):
``config`` (path of the florist TOML on the ServerApp's machine), ``overwrite`` (start the run directory
afresh), ``round-timeout`` (seconds to wait for a round's replies; 0: the config's ``federation.client_timeout``,
and if that is 0 too, until every message is answered, which Flower does with an error for a SuperNode that
stopped sending heartbeats) and ``node-wait`` (seconds to wait for every client's SuperNode at the start).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .. import models
from ..aggregation import Adapter
from ..base_weights import BaseWeights, adapted_module_names
from ..config import ConfigError, RunConfig, check_engine, config_from_toml, load_config
from ..jobs import ClientJob, ClientStart, Factors
from ..models import DEFAULT_MODEL, load_model
from ..rundir import RunDirectory
from ..setup import check_model_config, load_partition_examples, local_trainer, write_results
from .flower import SIMULATION_BACKEND, serve_run
from .flower_messages import (
    MAX_INDEX,
    MessageError,
    adapter_from_record,
    adapter_record,
    as_bool,
    as_float,
    description_content,
    factors_record,
    int_field,
    job_config,
    module_names,
    read_factors,
    read_job,
    sent_base_keys,
    str_field,
    update_content,
)

MAX_CONFIG = 10**6  # characters of the run's config TOML in a message

# --- the client ------------------------------------------------------------------------------------------------------


@dataclass
class _NodeModel:
    model: object
    tokenizer: object
    base: BaseWeights


_models: dict[str, _NodeModel] = {}  # one model per ClientApp process: the latest run's
_examples: dict[str, list[dict]] = {}


def client_app(load_model: Callable | None = None, mods: Sequence = ()) -> ClientApp:
    """A florist ClientApp. ``load_model`` replaces ``florist.models.load_model`` (same call), e.g. a test's tiny
    model; ``mods`` are Flower mods wrapped around every message."""
    loader = load_model or models.load_model
    app = ClientApp(mods=list(mods))
    # The simulation ships this app to its worker processes by value; the handlers stay thin and call module-level
    # functions, which those processes import, so the model and data caches below live once per process.

    @app.query("describe")
    def describe(message: Message, context: Context) -> Message:
        return describe_node(message, context, loader)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_job(message, context, loader)

    return app


def node_client(context: Context, config: RunConfig) -> int:
    """The client this SuperNode is: its node config's ``partition-id``, checked against the run."""
    node_config, where = context.node_config, "node config"
    if "partition-id" not in node_config:
        raise MessageError(
            "this SuperNode has no partition-id: start it with --node-config 'partition-id=K num-partitions=N'"
        )
    client = int_field(node_config, "partition-id", where, -MAX_INDEX, MAX_INDEX)
    if "num-partitions" in node_config:
        partitions = int_field(node_config, "num-partitions", where, 1, MAX_INDEX)
        if partitions != config.data.clients:
            raise MessageError(
                f"node config num-partitions={partitions}, but the run has data.clients={config.data.clients}"
            )
    if not 0 <= client < config.data.clients:
        raise MessageError(f"node config partition-id={client} is out of range for data.clients={config.data.clients}")
    return client


def _run_config(message: Message) -> RunConfig:
    """The run's config that a message carries."""
    toml = str_field(job_config(message.content), "config", "the message", MAX_CONFIG)
    return config_from_toml(toml, "the run's config", client=True)


def describe_node(message: Message, context: Context, loader: Callable) -> Message:
    """Which client this node is and how many examples it holds (it loads them, so training starts warm)."""
    config = _run_config(message)
    client = node_client(context, config)
    node = _node_model(config, loader)
    examples = _node_examples(config, node.tokenizer, client, loader)
    return Message(description_content(client, len(examples)), reply_to=message)


def train_job(message: Message, context: Context, loader: Callable) -> Message:
    """Train this node's client on the job in ``message`` and reply with the factors its mode uploads."""
    job_record = job_config(message.content)
    config = _run_config(message)
    client = node_client(context, config)
    job = read_job(message.content)
    if job.client != client:
        raise MessageError(f"this SuperNode holds client {client}'s data, not client {job.client}'s")
    node = _node_model(config, loader)
    examples = _node_examples(config, node.tokenizer, client, loader)
    trainer = local_trainer(config, node.model, node.tokenizer)
    with node.base.holding(base_adapters(context.state, message.content, job)):
        upload, log, kept = trainer.train(
            examples, job.start, client_id=f"client {client}", kept=kept_factors(context.state, job.start)
        )
    keep_factors(context.state, job.start, kept)
    return Message(update_content(job_record, upload, log), reply_to=message)


# The factors a client keeps live in the node's ``context.state``, one ArrayRecord per name a job stores them under,
# not in this process: a SuperNode of a deployment starts a fresh ClientApp process for every message (Flower
# 1.41), and the simulation may hand a node's messages to any of its workers, but both keep each node's context
# for the whole run and give it to every ClientApp call.
KEPT_PREFIX = "florist.kept."


def kept_factors(state: RecordDict, start: ClientStart) -> Factors | None:
    """The factors this node's client kept under ``start.keep_from``, or None (a first round, or none kept)."""
    if start.keep_from is None or KEPT_PREFIX + start.keep_from not in state.array_records:
        return None
    record = state.array_records[KEPT_PREFIX + start.keep_from]
    where = "the factors this node kept"
    return read_factors(record, module_names(record), start.mode.keeps, where, "the factors its mode keeps")


def keep_factors(state: RecordDict, start: ClientStart, kept: Factors) -> None:
    """Keep what training left to keep under every name of ``start.keep_as`` (the branches that go on from it)."""
    if not start.mode.keeps:
        return
    for name in start.keep_as:
        state[KEPT_PREFIX + name] = factors_record(kept)


# The updates in a client's base live in ``context.state`` too, one ArrayRecord per key: a node is sent each once.
BASE_STATE_PREFIX = "florist.base."


def base_adapters(state: RecordDict, content: RecordDict, job: ClientJob) -> list[Adapter]:
    """The job's base updates, in order: those its message carries, kept in ``state`` for later rounds, and the others
    from ``state`` (``BaseNotHeld`` where the node lost them: the server then sends them all)."""
    sent = sent_base_keys(content)
    out = []
    for delta in job.base_deltas:
        if delta.key in sent:
            out.append(delta.load())
            state[BASE_STATE_PREFIX + delta.key] = adapter_record(out[-1])
        elif BASE_STATE_PREFIX + delta.key in state.array_records:
            out.append(adapter_from_record(state.array_records[BASE_STATE_PREFIX + delta.key], "this node's state"))
        else:
            out.append(delta.load())  # raises BaseNotHeld
    return out


def _loader_key(loader: Callable) -> str:
    return f"{getattr(loader, '__module__', '')}.{getattr(loader, '__qualname__', repr(loader))}"


def _node_model(config: RunConfig, loader: Callable) -> _NodeModel:
    key = json.dumps([dataclasses.asdict(config.model), config.lora.target_modules, _loader_key(loader)])
    if key not in _models:
        models.check_device(config.model.device)  # a node without the run's device refuses the job in one line
        _models.clear()  # free the previous run's model before loading another
        model, tokenizer = loader(config.model.name, dtype="float32", device=config.model.device)
        _models[key] = _NodeModel(
            model, tokenizer, BaseWeights(model, adapted_module_names(model, config.lora.target_modules))
        )
    return _models[key]


def _node_examples(config: RunConfig, tokenizer, client: int, loader: Callable) -> list[dict]:
    key = json.dumps([dataclasses.asdict(config.data), config.seed, config.model.name, _loader_key(loader), client])
    if key not in _examples:
        _examples[key] = load_partition_examples(config, tokenizer, client)
    return _examples[key]


# --- the server (deployment) -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentSettings:
    config: str
    overwrite: bool = False
    round_timeout: float = 0.0  # 0: wait until every message is answered
    node_wait: float = 300.0

    @classmethod
    def from_run_config(cls, run_config) -> DeploymentSettings:
        if not run_config.get("config"):
            raise ConfigError("the run config has no 'config': pass --run-config 'config=\"/path/to/run.toml\"'")
        where = "the run config"
        try:
            return cls(
                config=str_field(run_config, "config", where, 4096),
                overwrite=as_bool(run_config.get("overwrite", False), f"{where}: overwrite"),
                round_timeout=as_float(run_config.get("round-timeout", 0.0), f"{where}: round-timeout", 0.0),
                node_wait=as_float(run_config.get("node-wait", 300.0), f"{where}: node-wait", 0.0),
            )
        except MessageError as e:
            raise ConfigError(str(e)) from None


def server_app(load_model: Callable | None = None) -> ServerApp:
    """A florist ServerApp for a deployment; ``load_model`` as for ``client_app``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve_deployment(grid, DeploymentSettings.from_run_config(context.run_config), load_model)

    return app


def serve_deployment(grid: Grid, settings: DeploymentSettings, load_model: Callable | None = None) -> None:
    """Run (or resume) the florist config ``settings.config`` over the SuperNodes connected to ``grid``."""

    def log(message: str) -> None:
        print(f"florist: {message}", flush=True)

    config = dataclasses.replace(load_config(settings.config), engine="flower")
    check_model_config(config)  # before the run directory is touched or any weights load
    check_engine(config)
    rundir = RunDirectory(config.output, base_model=config.model.name or DEFAULT_MODEL)
    done = rundir.open(config.to_toml(), overwrite=settings.overwrite)
    with rundir:  # the directory's lock is held until the ServerApp is done with it, however it ends
        for note in rundir.notes:
            log(note)
        if done < config.federation.rounds:
            round_timeout = settings.round_timeout or config.federation.client_timeout or None
            serve_run(
                grid,
                config,
                rundir,
                done,
                round_timeout=round_timeout,
                node_wait=settings.node_wait,
                progress=False,
                log=log,
                load_model=load_model,
            )
        write_results(rundir, config)
    log(f"results in {rundir.path}")


server = server_app()
client = client_app()


# --- the simulation ---------------------------------------------------------------------------------------------------


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
    It lives here, beside the ClientApp it ships to the simulated SuperNodes.
    """
    from flwr.simulation import run_simulation as flower_run_simulation

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
