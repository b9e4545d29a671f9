"""The run directory: what a run writes, and how a killed run is picked up again.

    run/
      config.toml                   the resolved configuration
      state.json                    rounds finished (written last in a round, so it never runs ahead)
      metrics.jsonl                 one line per branch and round (round 0: the base model)
      rounds/001/clients/<group>/client_K/   each client's trained adapter (PEFT, scaling folded into B)
      rounds/001/<branch>/          the global adapter (PEFT), or client_K/ per client (FlexLoRA)
      results.md, results.csv       the paper-style table

Every file is written to a temporary name and renamed, so a kill leaves either the old
file or the new one. A round that did not finish is removed and run again on resume, and so
are the temporary files a kill left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .adapters import read_adapter, write_adapter, write_adapters
from .aggregation import AggregationResult, ModuleAggregate
from .server import Branch, ClientResult, RoundRecord


class RunDirError(ValueError):
    """A run directory that cannot be used as asked."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name beside ``path``, flush it to disk, then rename: neither a reader nor a crash ever
    sees half a file. The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class RunDirectory:
    def __init__(self, path: str | Path, base_model: str | None):
        self.path = Path(path)
        self.base_model = base_model

    # --- starting and resuming ---------------------------------------------------------------------------------

    def open(self, config_toml: str, overwrite: bool = False) -> int:
        """Prepare the directory; returns the number of rounds already finished (0 for a new run)."""
        config_file = self.path / "config.toml"
        if self.path.exists() and any(self.path.iterdir()):
            if overwrite:
                shutil.rmtree(self.path)
            elif not config_file.exists():
                raise RunDirError(f"{self.path}: exists and is not a florist run directory; choose another --output")
            elif config_file.read_text() != config_toml:
                raise RunDirError(
                    f"{self.path}: holds a run with a different configuration; pass --overwrite or another --output"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_file, config_toml)
        done = self.completed_rounds()
        self._drop_unfinished(done)
        return done

    def _drop_unfinished(self, done: int) -> None:
        """Remove what a killed round left: its directory and any metrics lines written before state.json."""
        rounds = self.path / "rounds"
        for d in rounds.glob("*") if rounds.exists() else []:
            if d.name.isdigit() and int(d.name) > done:
                shutil.rmtree(d)
        # with no round finished the base model is scored again (round 0), so its earlier line goes too
        kept = [m for m in self.metrics() if m["round"] <= done] if done else []
        if kept != self.metrics():
            self._write_metrics(kept)
        for leftover in sorted(self.path.rglob(".*.tmp")):  # atomic writes' temporary names, cut short by a kill
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def completed_rounds(self) -> int:
        state = self.path / "state.json"
        return json.loads(state.read_text())["completed_rounds"] if state.exists() else 0

    def restore_history(self, branches: Sequence[Branch], done: int, num_clients: int) -> None:
        """Rebuild each branch's global results of the finished rounds from the saved adapters (bit-exact)."""
        for b in branches:
            b.history = [self._load_result(b, r, num_clients) for r in range(1, done + 1)]

    def _load_result(self, branch: Branch, round_number: int, num_clients: int) -> AggregationResult:
        d = self.round_dir(round_number) / branch.label
        if (d / "client_0").exists():
            per_client = [_load_modules(d / f"client_{k}") for k in range(num_clients)]
            return AggregationResult(branch.method.name, _load_modules(d / "global"), per_client)
        return AggregationResult(branch.method.name, _load_modules(d))

    # --- writing ------------------------------------------------------------------------------------------------

    def round_dir(self, round_number: int) -> Path:
        return self.path / "rounds" / f"{round_number:03d}"

    def save_clients(self, round_number: int, group: str, results: Sequence[ClientResult]) -> None:
        for r in results:
            modules = {n: ModuleAggregate(A=f.A, B=f.B * f.scaling) for n, f in r.update.modules.items()}
            info = {"client": r.client, "num_examples": r.update.num_examples, "steps": r.log.steps,
                    "tokens": r.log.tokens, "losses": r.log.losses, "seconds": r.log.seconds}
            write_adapter(
                self.round_dir(round_number) / "clients" / group / f"client_{r.client}", modules, self.base_model,
                extra_files={"client.json": json.dumps(info, indent=1)}, overwrite=True,
            )

    def save_round(self, round_number: int, branches: Sequence[Branch], records: Sequence[RoundRecord]) -> None:
        """The round's global adapters, then its metrics, then state.json last: the round counts once all is on disk."""
        by_label = {r.branch: r for r in records}
        for b in branches:
            result = b.history[-1]
            record = json.dumps(by_label[b.label].to_dict(), indent=1)
            singular = {n: m.singular_values.tolist() for n, m in result.modules.items() if m.singular_values is not None}
            extra = {"aggregation.json": record, **({"spectra.json": json.dumps(singular)} if singular else {})}
            target = self.round_dir(round_number) / b.label
            if result.per_client is not None:
                adapters = {"global": result.modules} | {f"client_{k}": a for k, a in enumerate(result.per_client)}
                write_adapters(target, adapters, self.base_model, extra_files=extra, overwrite=True)
            else:
                write_adapter(target, result.modules, self.base_model, extra_files=extra, overwrite=True)
        self.append_metrics(records)
        atomic_write_text(self.path / "state.json", json.dumps({"completed_rounds": round_number}))

    def append_metrics(self, records: Sequence[RoundRecord]) -> None:
        self._write_metrics(self.metrics() + [r.to_dict() for r in records])

    def _write_metrics(self, lines: list[dict]) -> None:
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in lines))

    def metrics(self) -> list[dict]:
        f = self.path / "metrics.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines() if line] if f.exists() else []


def _load_modules(path: Path) -> dict[str, ModuleAggregate]:
    factors, _ = read_adapter(path)
    return {n: ModuleAggregate(A=f.A, B=f.B * f.scaling if f.scaling != 1.0 else f.B) for n, f in factors.items()}
