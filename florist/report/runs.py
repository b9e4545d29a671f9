"""A run directory as the report reads it: its records checked field by field, its config.toml, the clients'
training and the singular values a branch saved, and the results table built from them.

What the report knows of a method it reads from the method's declaration (``florist.methods``); a method that
is not registered is reported by its key, as a method without a sweep.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..methods import METHODS, Method, format_value
from ..reading import parse_json_lines, path_kind, read_json_file, read_text_file
from ..results import (
    ResultRow,
    compared,
    is_pick,
    is_swept,
    method_of,
    paper_table,
    rows_from_records,
    value_header,
)


class ReportError(ValueError):
    """A path that is not a run directory, or a run that cannot be reported; the message names it."""


@dataclass
class Run:
    """What a run directory holds, as the report needs it."""

    path: Path
    name: str
    config: dict
    records: list[dict]
    table: list[ResultRow]
    training: dict = field(default_factory=dict)  # tokens, seconds, clients, per group

    @property
    def rounds(self) -> int:
        return max((r["round"] for r in self.records), default=0)

    @property
    def base(self) -> dict | None:
        return next((r["evaluation"] for r in self.records if r["round"] == 0), None)

    @property
    def has_accuracy(self) -> bool:
        return any(r.accuracy is not None for r in self.table)

    @property
    def has_loss(self) -> bool:
        return any(r.heldout_loss is not None for r in self.table)

    def compared_rows(self) -> list[ResultRow]:
        return [r for r, keep in zip(self.table, compared(self.table)) if keep]

    def baselines(self) -> list[ResultRow]:
        """The rows of methods without a sweep (those of methods not registered among them)."""
        return [r for r in self.table if not is_swept(r)]

    def swept(self) -> list[Method]:
        """The methods with a sweep that have rows in the table, in table order."""
        return list({r.method: method_of(r) for r in self.table if is_swept(r)}.values())

    def picks(self, method: Method | None = None) -> list[ResultRow]:
        """The swept methods' picks (of ``method`` alone if given), in table order."""
        return [r for r in self.table if is_pick(r) and (method is None or r.method == method.name)]

    def sweep_rows(self, method: Method | None = None) -> list[ResultRow]:
        """Every value of the swept methods' sweeps (of ``method`` alone if given), picks left out."""
        return [r for r in self.table if is_swept(r) and not is_pick(r) and (method is None or r.method == method.name)]

    @property
    def has_cuts(self) -> bool:
        """Whether some branch's clients cut their uploads (``federation.upload_thresholds`` below 1)."""
        return any(r.upload_threshold != 1.0 for r in self.table)

    def upload_ranks(self, label: str, round_number: int = 1) -> list[dict[str, int]]:
        """Per participant, each module's kept upload rank in a branch's round (empty: whole pairs)."""
        record = next((r for r in self.records if r["round"] == round_number and r["branch"] == label), {})
        ranks = record.get("upload_ranks", [])
        return ranks if isinstance(ranks, list) and all(_is_ranks(x) for x in ranks) else []

    def ranks(self, method: Method, round_number: int | None = None) -> dict[float, dict[str, int]]:
        """value -> {module: rank kept} of a swept method's branches in a round (default: the last)."""
        wanted = self.rounds if round_number is None else round_number
        return {
            r["threshold"]: r["ranks"]
            for r in self.records
            if r["round"] == wanted and r["method"] == method.name and r["threshold"] is not None
        }


def value_text(r: ResultRow) -> str:
    """A swept row's value as the report writes it beside the row's name: "τ=0.90" (and "τ up=0.80" for a row whose
    clients cut their uploads)."""
    text = f"{value_header([r])}={format_value(r.threshold)}" if r.threshold is not None else ""
    if r.upload_threshold != 1.0:
        text += f"{', ' if text else ''}τ up={format_value(r.upload_threshold)}"
    return text


def settings(config: dict) -> SimpleNamespace:
    """config.toml's tables as attributes (``settings(config).federation.rounds``), as methods read a run's config."""
    return SimpleNamespace(**{k: settings(v) if isinstance(v, dict) else v for k, v in config.items()})


def setting(config: dict, key: str, default: Any = "?") -> Any:
    """The value of a dotted key ("federation.rounds") of config.toml, or ``default`` where it has none."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def load_run(path: str | Path) -> Run:
    """Read a run directory; a missing directory or one without metrics.jsonl is a ``ReportError``, and so is every
    damaged file in it that the report reads (the message names the file, and the line and field where it can)."""
    path = Path(path)
    kind = path_kind(path, ReportError)
    if kind is None:
        raise ReportError(f"{path}: no such run directory")
    if kind != "dir":
        raise ReportError(f"{path}: not a directory")
    metrics = path / "metrics.jsonl"
    if path_kind(metrics, ReportError) is None:
        raise ReportError(f"{path}: not a run directory (no metrics.jsonl)")
    records = []
    for number, record in parse_json_lines(read_text_file(metrics, ReportError), str(metrics), ReportError):
        check_record(record, f"{metrics}:{number}")
        records.append(record)
    config = _read_config(path / "config.toml")
    try:
        rows = rows_from_records(records)
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise ReportError(f"{metrics}: a record lacks a field the table needs ({e})") from None
    table = _paper_table(rows, config, path / "config.toml")
    if not table:
        raise ReportError(f"{path}: no finished round yet (metrics.jsonl holds only the base model)")
    return Run(path, path.resolve().name, config, records, table, _training(path))


def _paper_table(rows: Sequence[ResultRow], config: dict, config_file: Path) -> list[ResultRow]:
    """The table, its picks made from the run's settings. The records are checked by then: a pick that fails, fails
    on a setting of config.toml (a tolerance that is not a number, say)."""
    try:
        return paper_table(rows, settings(config))
    except (TypeError, ValueError, ArithmeticError, AttributeError) as e:
        swept = dict.fromkeys(m.display for m in map(method_of, rows) if m is not None and m.sweep is not None)
        raise ReportError(f"{config_file}: {', '.join(swept)} cannot pick rows under these settings ({e})") from None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    """A number a float holds: not NaN or infinite, and no integer too large for a float."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _optional(check):
    return lambda value: value is None or check(value)


def _is_amount(value: object) -> bool:
    return _is_number(value) and value >= 0  # NaN fails the comparison


def _is_singular_value(value: object) -> bool:
    return _is_amount(value) and math.isfinite(value)


def _is_ranks(value: object) -> bool:
    return isinstance(value, dict) and bool(value) and all(_is_count(v) for v in value.values())


def _list_of(check):
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


# What every metrics record must hold (field, check, what it must be), what a finished round's records hold besides,
# and the fields of a record's "evaluation" and "communication" objects, as the tables and plots use them.
RECORD_FIELDS = (
    ("round", _is_count, "a round number"),
    ("branch", lambda v: isinstance(v, str), "a name"),
    ("evaluation", lambda v: isinstance(v, dict), "an object"),
)
ROUND_FIELDS = (
    ("method", lambda v: isinstance(v, str), "a method name"),
    ("threshold", _optional(_is_finite), "a number or null"),
    ("ranks", _is_ranks, "an object of module ranks"),
    ("communication", lambda v: isinstance(v, dict), "an object"),
    ("server_seconds", _is_number, "a number"),
)
# finite: a pick compares them, and no comparison with NaN holds
EVALUATION_FIELDS = ("accuracy", "micro_accuracy", "heldout_loss", "seconds")
COMMUNICATION_FIELDS = (
    "eff_e4",
    "total_upload_params",
    "total_download_params",
    "total_upload_bytes",
    "total_download_bytes",
)


def check_record(record: object, where: str) -> None:
    """A metrics.jsonl record with every field the report reads, of the type it reads it as; ``where`` (file:line)
    and the field open the error."""
    if not isinstance(record, dict):
        raise ReportError(f"{where}: not a metrics record (a JSON object), found a {type(record).__name__}")
    fields = RECORD_FIELDS + (ROUND_FIELDS if _is_count(record.get("round")) and record["round"] > 0 else ())
    for key, check, what in fields:
        if key not in record:
            raise ReportError(f"{where}: not a metrics record (no {key!r})")
        if not check(record[key]):
            raise ReportError(f"{where}: {key} is {_shown(record[key])}, expected {what}")
    if record["round"] > 0:
        _check_swept_value(record, where)
        up = record.get("upload_threshold", 1.0)
        if not (_is_finite(up) and 0 < up <= 1):
            raise ReportError(f"{where}: upload_threshold is {_shown(up)}, expected a number in (0, 1]")
    evaluation = record["evaluation"]
    for key in EVALUATION_FIELDS:
        if not _optional(_is_finite)(evaluation.get(key)):
            raise ReportError(f"{where}: evaluation.{key} is {_shown(evaluation[key])}, expected a finite number")
    if not _optional(_is_count)(evaluation.get("n_questions")):
        raise ReportError(f"{where}: evaluation.n_questions is {_shown(evaluation['n_questions'])}, expected a count")
    for key in COMMUNICATION_FIELDS if record["round"] > 0 else ():
        if not _is_amount(record["communication"].get(key)):
            raise ReportError(
                f"{where}: communication.{key} is {_shown(record['communication'].get(key))}, expected a number >= 0"
            )


def _check_swept_value(record: dict, where: str) -> None:
    """A record of a method with a sweep holds one of the values the method's sweep accepts."""
    method = METHODS.get(record["method"])
    if method is None or method.sweep is None:
        return
    value = record["threshold"]
    if value is None:
        raise ReportError(f"{where}: a {method.display} record without its threshold")
    _, problem = method.sweep.parse(repr(value))
    if problem:
        raise ReportError(
            f"{where}: threshold {_shown(value)} is not a {method.display} {method.sweep.name}: {problem}"
        )


def _shown(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


# config.toml settings the report formats as numbers or joins as lists; anything else it only prints (settings a
# method reads, its picks' tolerance say, are the method's to use: a pick they make fail names config.toml).
CONFIG_SECTIONS = ("model", "data", "lora", "train", "federation", "eval")
CONFIG_TYPES = {
    "federation.methods": (_list_of(lambda v: isinstance(v, str)), "a list of method names"),
    "lora.ranks": (_list_of(_is_count), "a list of ranks"),
    "lora.alpha_per_rank": (_is_number, "a number"),
    "lora.target_modules": (
        lambda v: isinstance(v, str) or _list_of(lambda x: isinstance(x, str))(v),
        "a list of module names or a regex",
    ),
    "train.epochs": (_is_number, "a number"),
}


def _read_config(path: Path) -> dict:
    if path_kind(path, ReportError) is None:
        return {}
    text = read_text_file(path, ReportError)
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ReportError(f"{path}: invalid TOML: {e}") from None
    except RecursionError:
        raise ReportError(f"{path}: invalid TOML: nested too deeply") from None
    for section in CONFIG_SECTIONS:
        if not isinstance(config.get(section, {}), dict):
            raise ReportError(f"{path}: {section} is {_shown(config[section])}, expected a [{section}] table")
    for key, (check, what) in CONFIG_TYPES.items():
        section, name = key.split(".")
        if name in config.get(section, {}) and not check(config[section][name]):
            raise ReportError(f"{path}: {key} is {_shown(config[section][name])}, expected {what}")
    return config


def _training(path: Path) -> dict:
    """Client training per group (the folders of rounds/NNN/clients/), summed over rounds, from each client's
    client.json."""
    groups: dict[str, dict] = {}
    # the folders are globbed and the file looked up in each: a glob would skip a client.json in a link loop unseen
    for info_file in sorted(d / "client.json" for d in path.glob("rounds/*/clients/*/client_*")):
        if path_kind(info_file, ReportError) is None:
            continue  # a client that saved no info is left out of the totals
        info = read_json_file(info_file, ReportError)
        if not isinstance(info, dict):
            raise ReportError(f"{info_file}: expected a JSON object, found a {type(info).__name__}")
        for key, check in (("steps", _is_count), ("tokens", _is_count), ("seconds", _is_number)):
            if not check(info.get(key, 0)):
                raise ReportError(f"{info_file}: {key} is {_shown(info[key])}, expected a number")
        g = groups.setdefault(info_file.parent.parent.name, {"clients": 0, "steps": 0, "tokens": 0, "seconds": 0.0})
        g["clients"] += 1
        g["steps"] += info.get("steps", 0)
        g["tokens"] += info.get("tokens", 0)
        g["seconds"] += info.get("seconds", 0.0)
    return groups


def load_spectra(run: Run, round_number: int = 1) -> dict[str, list[float]]:
    """The singular values per module a branch saved in a round (rounds/NNN/<branch>/spectra.json): of a swept
    method's branch if one saved them, lowest value first, else of the first branch in table order that did."""
    round_dir = run.path / "rounds" / f"{round_number:03d}"
    swept = sorted(run.sweep_rows(), key=lambda r: (run.swept().index(method_of(r)), -r.upload_threshold, r.threshold))
    others = [r for r in run.table if not is_swept(r)]
    for f in (round_dir / r.label / "spectra.json" for r in swept + others if _is_folder_name(r.label)):
        if path_kind(f, ReportError) is None:
            continue
        spectra = read_json_file(f, ReportError)
        if not isinstance(spectra, dict) or not all(_list_of(_is_singular_value)(v) for v in spectra.values()):
            raise ReportError(f"{f}: expected singular values per module ({{module: [finite numbers >= 0]}})")
        return spectra
    return {}


def _is_folder_name(label: str) -> bool:
    """Whether a branch label from metrics.jsonl names one folder (the run's own do; a damaged record may not)."""
    return label not in ("", ".", "..") and os.sep not in label and "/" not in label and "\0" not in label


def measured(run: Run) -> list[tuple[str, str, bool]]:
    """(ResultRow attribute, axis label, higher is better) for every metric the run measured."""
    out = []
    if run.has_accuracy:
        out.append(("accuracy", "accuracy (%)", True))
    if run.has_loss:
        out.append(("heldout_loss", "held-out loss (nats / token)", False))
    return out


def metric_value(r: ResultRow, attribute: str) -> float | None:
    """A row's metric as the report shows it: accuracy in percent."""
    v = getattr(r, attribute)
    return None if v is None else (100 * v if attribute == "accuracy" else v)


def listed(words: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    if len(words) < 2:
        return "".join(words)
    return f"{', '.join(words[:-1])} and {words[-1]}"


def picks_in_short(run: Run) -> str:
    """The run's picks, each swept method's labels sharing their stem ("X-O", "X-E" -> "X-O/E"), listed."""
    return listed([_shortened([r.label for r in run.picks(m)]) for m in run.swept() if run.picks(m)])


def _shortened(labels: Sequence[str]) -> str:
    stem = os.path.commonprefix(list(labels))
    stem = stem[: stem.rfind("-") + 1]
    if len(labels) < 2 or not stem:
        return listed(labels)
    return stem + "/".join(label[len(stem) :] for label in labels)


def load_upload_spectra(run: Run, round_number: int = 1) -> dict[int, dict[str, list[float]]]:
    """Each client's upload spectra (client.json's ``upload_spectra``) of a round's first training group that has
    them: client -> {module: singular values}; empty where no client cut its upload."""
    round_dir = run.path / "rounds" / f"{round_number:03d}" / "clients"
    for group in sorted(round_dir.glob("*")) if path_kind(round_dir, ReportError) == "dir" else []:
        out = {}
        for info_file in sorted(group.glob("client_*/client.json")):
            info = read_json_file(info_file, ReportError)
            spectra = info.get("upload_spectra") if isinstance(info, dict) else None
            if spectra is None:
                continue
            if not isinstance(spectra, dict) or not all(_list_of(_is_singular_value)(v) for v in spectra.values()):
                raise ReportError(f"{info_file}: upload_spectra: expected {{module: [finite numbers >= 0]}}")
            client = info_file.parent.name.removeprefix("client_")
            if client.isdigit():
                out[int(client)] = spectra
        if out:
            return out
    return {}
