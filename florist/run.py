"""A whole federated run from a ``RunConfig``, on the engine it names: the rounds, then the results.

The assembly is in ``setup``, the loop in ``server``, training in ``client``, the files in ``rundir``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import RunConfig, check_engine
from .engines.inprocess import InProcessEngine
from .models import DEFAULT_MODEL
from .progress import library_bars, log_to_stderr
from .rundir import RunDirectory
from .setup import (
    build_federation,
    check_model_config,
    load_client_examples,
    load_server_model,
    local_trainer,
    write_results,
)


def run(
    config: RunConfig, overwrite: bool = False, progress: bool = True, log: Callable[[str], None] | None = None
) -> Path:
    """Run (or resume) the federation ``config`` describes, on ``config.engine``; returns the run directory.

    ``progress``: bars on a terminal, a line per client trained elsewhere (False: none). ``log``: where the run's
    other messages go (default: stderr, dimmed).
    """
    check_model_config(config)  # a wrong device or target module is refused before the run directory is touched
    check_engine(config)
    log = log or log_to_stderr
    rundir = RunDirectory(config.output, base_model=config.model.name or DEFAULT_MODEL)
    done = rundir.open(config.to_toml(), overwrite=overwrite)
    # the directory stays locked against a second florist process until this run ends, however it ends
    with rundir, library_bars(progress):
        for note in rundir.notes:
            log(note)
        if done >= config.federation.rounds:
            log(f"{rundir.path}: all {done} rounds already finished")
        elif config.engine == "flower":
            from .engines.flower_app import run_simulation  # flwr and ray are imported only for this engine

            run_simulation(config, rundir, done, progress=progress, log=log)
        else:
            _run_in_process(config, rundir, done, progress, log)
        write_results(rundir, config)
    return rundir.path


def _run_in_process(
    config: RunConfig, rundir: RunDirectory, done: int, progress: bool, log: Callable[[str], None]
) -> None:
    server = load_server_model(config, log)
    log(f"loading and tokenizing data {config.data.train!r}")
    examples, _ = load_client_examples(config, server.tokenizer, progress)
    sizes = [len(e) for e in examples]
    log("client sizes: " + ", ".join(str(n) for n in sizes))
    engine = InProcessEngine(
        server.base,
        local_trainer(config, server.model, server.tokenizer),
        examples,
        progress=progress,
        client_timeout=config.federation.client_timeout,
        log=log,
    )
    federation = build_federation(config, server, rundir, done, sizes, engine, log, progress=progress)
    for round_number in range(done + 1, config.federation.rounds + 1):
        federation.run_round(round_number)
        log(f"round {round_number} finished and saved")
