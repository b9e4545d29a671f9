"""The run directory: what a run writes, and how a killed run is picked up again.

    run/
      config.toml                   the resolved configuration
      state.json                    rounds finished (written last in a round, so it never runs ahead)
      metrics.jsonl                 one line per branch and round (round 0: the base model)
      rounds/001/clients/<group>/client_K/   each client's trained adapter (PEFT, scaling folded into B)
      rounds/001/<branch>/          the global adapter (PEFT), or client_K/ per client (FlexLoRA)
      results.md, .csv, .json       the paper-style table
      .florist.lock                 held (flock) by the one florist process running in the directory

Every file is written to a temporary name and renamed, so a kill leaves either the old
file or the new one. A round that did not finish is removed and run again on resume, and so
are the temporary files a kill left behind. A state.json or metrics.jsonl torn by a crash or a
copy cut short is repaired back to the last round saved whole. Nothing florist did not write is
ever deleted: ``--overwrite`` refuses a directory that holds anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tomllib
from collections.abc import Sequence
from pathlib import Path

from .adapters import (
    CONFIG_NAME,
    RESIDUAL_NAME,
    WEIGHTS_NAME,
    WRITTEN_EXTRA_FILES,
    AdapterError,
    read_adapter,
    write_adapter,
    write_adapters,
)
from .aggregation import Adapter, AggregationResult, ModuleAggregate
from .aggregation.base import fold_scaling
from .communication import part_params
from .config import RunConfig
from .files import (
    TEMPORARY_NAME,
    Scan,
    atomic_write_bytes,
    atomic_write_text,
    check_writable_place,
    describe_foreign,
    failure_reason,
    make_directory,
    scan,
    writing,
)
from .history import GLOBAL, RESIDUAL, History
from .jobs import ClientResult
from .reading import leading_records, reason
from .server import Branch, RoundRecord

__all__ = ["RunDirError", "RunDirectory", "atomic_write_bytes", "atomic_write_text", "written_by_a_run"]

CONFIG, STATE, METRICS, LOCK_NAME = "config.toml", "state.json", "metrics.jsonl", ".florist.lock"
# Everything florist writes in a run directory (``florist report`` included, whose default place it is).
RUN_FILES = frozenset(
    {
        CONFIG,
        STATE,
        METRICS,
        LOCK_NAME,
        "results.md",
        "results.csv",
        "results.json",
        "flower_traffic.jsonl",
        "report.md",
    }
)
ROUND_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME}) | WRITTEN_EXTRA_FILES


class RunDirError(ValueError):
    """A run directory that cannot be used as asked."""


def written_by_a_run(parts: tuple[str, ...], is_dir: bool) -> bool:
    """Whether florist writes an entry at the relative path ``parts`` of a run directory."""
    name, depth = parts[-1], len(parts)
    if depth == 1:
        return name in ("rounds", "plots") if is_dir else name in RUN_FILES
    if parts[0] == "plots":
        return depth == 2 and not is_dir and name.endswith(".png")
    if parts[0] == "rounds":
        return (is_dir and name.isdigit()) if depth == 2 else (is_dir or name in ROUND_FILES)
    return False


class RunDirectory:
    def __init__(self, path: str | os.PathLike, base_model: str | None):
        self.empty_path = not os.fspath(path)  # Path("") is ".": the working directory, never meant
        self.path = Path(path)
        self.base_model = base_model
        self.notes: list[str] = []  # what ``open`` repaired, for the run's log
        self._lock: int | None = None

    # --- starting and resuming ---------------------------------------------------------------------------------

    def open(self, config_toml: str, overwrite: bool = False) -> int:
        """Prepare the directory and hold its lock until ``close``; returns the number of rounds already finished
        (0 for a new run). ``overwrite`` deletes an earlier run, if all the directory holds is florist's."""
        self._check_place(overwrite)  # before anything is written: a refused directory gets nothing, not even a lock
        make_directory(self.path)
        self._take_lock()
        try:
            self._check_place(overwrite)  # again: another process may have changed it before the lock was ours
            if overwrite:
                self._clear()
            elif (self.path / CONFIG).exists():
                self._check_config(config_toml)
            atomic_write_text(self.path / CONFIG, config_toml)
            claimed, done = self._finished_rounds()
            self._drop_unfinished(done)
            if claimed != done:
                atomic_write_text(self.path / STATE, json.dumps({"completed_rounds": done}))
            return done
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory's lock (a process that ends, however, releases it too)."""
        fd, self._lock = self._lock, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit; the process's end releases the lock anyway
            self.close()

    def _check_place(self, overwrite: bool) -> None:
        """Refuse an empty path, a file, a directory that is not a run's, and (``overwrite``) one florist did not
        wholly write."""
        if self.empty_path:
            raise RunDirError("the run directory (output) is an empty path; name a directory")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: exists and is not a directory; choose another --output")
        if not self.path.is_dir():
            check_writable_place(self.path)
            return
        found = self._scan()
        if overwrite and found.foreign:
            raise RunDirError(
                f"{describe_foreign(self.path, found.foreign)}; refusing to delete it (move them out "
                "or choose another --output)"
            )
        others = sorted(n for n in os.listdir(self.path) if n != LOCK_NAME and not TEMPORARY_NAME.match(n))
        if others and not overwrite and CONFIG not in others:
            raise RunDirError(
                f"{self.path}: exists and is not a florist run directory (no {CONFIG}; it holds "
                f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); choose another --output"
            )

    def _scan(self) -> Scan:
        try:
            return scan(self.path, written_by_a_run)
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot read the directory ({failure_reason(e)})") from None

    def _take_lock(self) -> None:
        lock = self.path / LOCK_NAME
        with writing(lock):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by child processes (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() if isinstance(e, BlockingIOError) else ""
            os.close(fd)
            if not isinstance(e, BlockingIOError):
                raise RunDirError(f"{lock}: cannot lock it ({failure_reason(e)})") from None
            who = f"pid {holder}" if holder.isdigit() else "pid unknown"
            raise RunDirError(
                f"{self.path}: another florist process ({who}) is running in this directory; wait for "
                "it to finish or choose another --output"
            ) from None
        with contextlib.suppress(OSError):  # the pid only names the holder to others; a full disk must not stop the run
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    def _clear(self) -> None:
        """Delete the earlier run (all of it florist's: ``_check_place`` made sure), state.json first, so that a clear
        cut short leaves no finished round behind."""
        with writing(self.path):
            for p in sorted(self.path.iterdir(), key=lambda p: p.name != STATE):
                if p.name == LOCK_NAME:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    def _check_config(self, config_toml: str) -> None:
        """The stored configuration must be the one asked for, ``output`` aside: a moved run directory resumes."""
        try:
            stored = tomllib.loads(self._read(CONFIG).decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise RunDirError(
                f"{self.path / CONFIG}: not a valid TOML file ({reason(e)}); restore it, or pass "
                "--overwrite to start the run afresh"
            ) from None
        asked = tomllib.loads(config_toml)
        stored = _with_defaults(stored, tomllib.loads(RunConfig().to_toml()))  # settings added since it began
        stored.pop("output", None)
        asked.pop("output", None)
        if stored != asked:
            keys = _differing_keys(stored, asked)
            raise RunDirError(
                f"{self.path}: holds a run with a different configuration ({', '.join(keys[:3])}"
                f"{', ...' if len(keys) > 3 else ''} differ); pass --overwrite or another --output"
            )

    def _read(self, name: str) -> bytes:
        try:
            return (self.path / name).read_bytes()
        except OSError as e:
            raise RunDirError(f"{self.path / name}: cannot read it ({failure_reason(e)})") from None

    def _finished_rounds(self) -> tuple[int | None, int]:
        """(what state.json claims, None if it is unreadable; the rounds finished). A round is finished if state.json
        counts it and metrics.jsonl, written after its adapters, holds a line for each of its branches; a state.json
        or metrics.jsonl torn by a crash is so cut back to the last round saved whole."""
        claimed = self._claimed_rounds()
        lines, bad = self._read_metrics()
        done = self._whole_rounds(lines, self._saved_rounds() if claimed is None else claimed)
        if claimed is None:
            self.notes.append(f"{self.path / STATE}: not readable; going on after round {done}, the last saved whole")
        elif done < claimed:
            self.notes.append(
                f"{self.path / STATE} counts {claimed} rounds but {METRICS} holds {done} whole; going on "
                f"after round {done}"
            )
        if bad is not None:
            self.notes.append(
                f"{self.path / METRICS}: line {bad} is cut short or not a record; dropped it and the lines after it"
            )
        return claimed, done

    def _claimed_rounds(self) -> int | None:
        if not (self.path / STATE).exists():
            return 0
        try:
            count = json.loads(self._read(STATE))["completed_rounds"]
        except (ValueError, KeyError, TypeError):
            return None
        return count if _is_count(count) else None

    def _saved_rounds(self) -> int:
        rounds = self.path / "rounds"
        return max((int(d.name) for d in rounds.iterdir() if d.name.isdigit()), default=0) if rounds.is_dir() else 0

    def _whole_rounds(self, lines: list[dict], upto: int) -> int:
        """How many rounds from round 1 on (at most ``upto``) each have metrics for exactly the branches they saved."""
        done = 0
        while done < upto:
            d = self.round_dir(done + 1)
            if not d.is_dir():
                break
            saved = {p.name for p in d.iterdir() if p.is_dir() and not TEMPORARY_NAME.match(p.name)}
            saved.discard("clients")
            if not saved or {x["branch"] for x in lines if x["round"] == done + 1} != saved:
                break
            done += 1
        return done

    def _drop_unfinished(self, done: int) -> None:
        """Remove what a killed round left: its directory, any metrics lines written before state.json, and the
        temporary files of writes cut short; a round directory holding anything florist did not write is refused."""
        found = self._scan()
        rounds = self.path / "rounds"
        numbered = [d for d in rounds.iterdir() if d.name.isdigit()] if rounds.is_dir() else []
        later = sorted(d for d in numbered if int(d.name) > done)
        for d in later:
            here = f"rounds/{d.name}"
            foreign = [f for f in found.foreign if f == here or f.startswith(here + "/")]
            if foreign:
                raise RunDirError(
                    f"{describe_foreign(d, foreign)}; refusing to delete that unfinished round (move "
                    "them out and run again)"
                )
        with writing(self.path):
            for d in later:
                shutil.rmtree(d)
            # with no round finished the base model is scored again (round 0), so its earlier line goes too
            lines, bad = self._read_metrics()
            kept = [m for m in lines if m["round"] <= done] if done else []
            if kept != lines or bad is not None:
                self._write_metrics(kept)
            for leftover in found.temporary:
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    def restore_history(self, branches: Sequence[Branch], done: int, num_clients: int) -> None:
        """Give each branch a history backed by this directory, holding its finished rounds from the saved adapters
        (bit-exact): the newest in memory, the older read back when a client or the evaluator needs them."""
        lines, _ = self._read_metrics()
        participants = {(x["branch"], x["round"]): _client_list(x.get("participants")) for x in lines}
        for b in branches:
            b.history = History(load=self._loader(b))
            for r in range(1, done + 1):
                result = self._load_result(b, r, num_clients)
                b.history.append(result, participants.get((b.label, r), []), part_params(b.method, r, result))
                b.history.settle()

    def _loader(self, branch: Branch):
        def load(round_number: int, part: str) -> Adapter:
            d = self.round_dir(round_number) / branch.label
            if part == GLOBAL:
                path = d / "global" if (d / "client_0").exists() else d
            else:
                path = d / (RESIDUAL_NAME if part == RESIDUAL else part)
            try:
                return _load_modules(path)
            except AdapterError as e:
                raise RunDirError(f"round {round_number}'s saved adapter {path} cannot be read back ({e})") from None

        return load

    def _load_result(self, branch: Branch, round_number: int, num_clients: int) -> AggregationResult:
        d = self.round_dir(round_number) / branch.label
        try:
            residual = _load_modules(d / RESIDUAL_NAME) if (d / RESIDUAL_NAME).exists() else None
            if (d / "client_0").exists():
                per_client = [_load_modules(d / f"client_{k}") for k in range(num_clients)]
                return AggregationResult(branch.method.name, _load_modules(d / "global"), per_client, residual=residual)
            return AggregationResult(branch.method.name, _load_modules(d), residual=residual)
        except AdapterError as e:
            raise RunDirError(
                f"cannot resume: round {round_number}'s saved adapter is damaged ({e}); restore it, or "
                "pass --overwrite to start the run afresh"
            ) from None

    # --- writing ------------------------------------------------------------------------------------------------

    def round_dir(self, round_number: int) -> Path:
        return self.path / "rounds" / f"{round_number:03d}"

    def save_clients(self, round_number: int, group: str, results: Sequence[ClientResult]) -> None:
        for r in results:
            modules = {n: ModuleAggregate(A=f.A, B=fold_scaling(f)) for n, f in r.update.modules.items()}
            info = {
                "client": r.client,
                "num_examples": r.update.num_examples,
                "steps": r.log.steps,
                "tokens": r.log.tokens,
                "losses": r.log.losses,
                "seconds": r.log.seconds,
            }
            if r.spectra:  # an upload cut to a share of its energy: each module's whole spectrum
                info["upload_spectra"] = {n: S.tolist() for n, S in r.spectra.items()}
            write_adapter(
                self.round_dir(round_number) / "clients" / group / f"client_{r.client}",
                modules,
                self.base_model,
                extra_files={"client.json": json.dumps(info, indent=1)},
                overwrite=True,
            )

    def save_round(self, round_number: int, branches: Sequence[Branch], records: Sequence[RoundRecord]) -> None:
        """The round's global adapters, then its metrics, then state.json last: the round counts once all is on disk."""
        by_label = {r.branch: r for r in records}
        for b in branches:
            result = b.history.last
            record = json.dumps(by_label[b.label].to_dict(), indent=1)
            singular = {
                n: m.singular_values.tolist() for n, m in result.modules.items() if m.singular_values is not None
            }
            extra = {"aggregation.json": record, **({"spectra.json": json.dumps(singular)} if singular else {})}
            target = self.round_dir(round_number) / b.label
            residual = {RESIDUAL_NAME: result.residual} if result.residual is not None else {}
            if result.per_client is not None:
                adapters = {"global": result.modules} | {f"client_{k}": a for k, a in enumerate(result.per_client)}
                write_adapters(target, adapters | residual, self.base_model, extra_files=extra, overwrite=True)
            else:
                write_adapter(
                    target, result.modules, self.base_model, extra_files=extra, extra_adapters=residual, overwrite=True
                )
        self.append_metrics(records)
        atomic_write_text(self.path / STATE, json.dumps({"completed_rounds": round_number}))

    def append_metrics(self, records: Sequence[RoundRecord]) -> None:
        self._write_metrics(self.metrics() + [r.to_dict() for r in records])

    def _write_metrics(self, lines: list[dict]) -> None:
        atomic_write_text(self.path / METRICS, "".join(json.dumps(x) + "\n" for x in lines))

    def metrics(self) -> list[dict]:
        lines, bad = self._read_metrics()
        if bad is not None:
            raise RunDirError(
                f"{self.path / METRICS}: line {bad} is cut short or not a record; run the same command "
                "again to repair the run directory"
            )
        return lines

    def _read_metrics(self) -> tuple[list[dict], int | None]:
        """The records before the first line that is not one, and that line's number (None: every line is one)."""
        if not (self.path / METRICS).exists():
            return [], None
        return leading_records(self._read(METRICS), _is_metrics_record)


def _is_metrics_record(line) -> bool:
    return isinstance(line, dict) and isinstance(line.get("branch"), str) and _is_count(line.get("round"))


def _client_list(value) -> list[int]:
    """A metrics line's participants, as far as they are client indices (a hand-edited line loses only accounting)."""
    return [c for c in value if _is_count(c)] if isinstance(value, list) else []


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _with_defaults(stored: dict, defaults: dict) -> dict:
    """A stored configuration with the settings it lacks at their defaults: a run begun before florist had a setting
    ran as the setting's default runs, and resumes under it."""
    out = dict(stored)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two parsed TOML documents."""
    keys = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(prefix + key)
    return keys


def _load_modules(path: Path) -> dict[str, ModuleAggregate]:
    factors, _ = read_adapter(path)
    return {n: ModuleAggregate(A=f.A, B=fold_scaling(f)) for n, f in factors.items()}
