"""Damaged files through every reader florist has: instruction data, question files, the run directory the report
reads, and adapters. Whatever a file holds (bytes that are not UTF-8, broken or oddly shaped JSON, a directory, a
FIFO, a symbolic link loop), each reader ends in its own one-line error naming the file, or in a result the rest of
the program can use: never a traceback, a hang, or a UnicodeDecodeError / KeyError / JSONDecodeError escaping.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_fuzz import no_hang
from test_report import make_run
from typer.testing import CliRunner

from florist import evaluation as ev
from florist import models
from florist.adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterError, read_adapter
from florist.cli import app
from florist.data import DataError, load_clients, load_instructions
from florist.evaluation import (
    EvalDataError,
    Question,
    load_questions,
    questions_from_records,
)
from florist.report import (
    ReportError,
    build_report,
    load_run,
    load_spectra,
    plot_spectra,
    write_report,
)

SWEEP = settings(
    deadline=None,  # a loaded machine; a hang is the alarm's to catch
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same inputs every run: a failure is a bug to fix, never a flake
    max_examples=60,
)
ROOT = os.geteuid() == 0

GOOD_ROWS = [{"instruction": f"q{i}", "output": f"a{i}", "category": "ab"[i % 2]} for i in range(4)]
GOOD_QUESTIONS = [{"question": "2 + 2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}]
Q_PROJ = "model.layers.0.self_attn.q_proj"


# --- the readers -----------------------------------------------------------------------------------------------------


def write_adapter_files(
    directory: Path, tensors: dict[str, torch.Tensor] | None = None, r: int = 2, targets: tuple[str, ...] = ("q_proj",)
) -> Path:
    """A plain LoRA adapter of the tiny model's q_proj in layer 0 (64 x 64), written by hand."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": list(targets), "task_type": "CAUSAL_LM"}
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    tensors = tensors or {
        f"base_model.model.{Q_PROJ}.lora_A.weight": torch.randn(r, 64, generator=g),
        f"base_model.model.{Q_PROJ}.lora_B.weight": torch.randn(64, r, generator=g),
    }
    save_file(tensors, str(directory / WEIGHTS_NAME))
    return directory


@dataclass(frozen=True)
class Reader:
    """One door a file comes in by: ``setup(tmp)`` writes good files and returns the one to damage, ``read(tmp)``
    reads through florist as a command would, ``error`` is what a bad file must raise."""

    setup: Callable[[Path], Path]
    read: Callable[[Path], object]
    error: type[Exception]
    harmless: frozenset[str] = frozenset()  # damage that leaves a valid file (an empty config.toml sets nothing)


def _file(name: str, content: Callable[[Path], None]) -> Callable[[Path], Path]:
    def setup(tmp: Path) -> Path:
        content(tmp / name)
        return tmp / name

    return setup


def _json(rows) -> Callable[[Path], None]:
    return lambda p: p.write_text(json.dumps(rows))


def _table(rows) -> Callable[[Path], None]:
    import datasets

    return lambda p: (
        datasets.Dataset.from_list(rows).to_parquet(p)
        if p.suffix == ".parquet"
        else datasets.Dataset.from_list(rows).to_csv(p, index=False)
    )


def _client_folder(tmp: Path) -> Path:
    (tmp / "clients").mkdir()
    for k in range(2):
        _json(GOOD_ROWS)(tmp / "clients" / f"client_{k}.json")
    return tmp / "clients" / "client_1.json"


def _run_file(name: str) -> Callable[[Path], Path]:
    def setup(tmp: Path) -> Path:
        run = make_run(tmp / "run")
        if name == "spectra.json":
            return run / "rounds" / "001" / "florist@0.80" / "spectra.json"
        if name == "client.json":
            return run / "rounds" / "001" / "clients" / "shared" / "client_2" / "client.json"
        return run / name

    return setup


def _report(tmp: Path) -> object:
    runs = [load_run(tmp / "run")]
    load_spectra(runs[0])
    return build_report(runs, plots=False)


READERS = {
    "data JSON": Reader(
        _file("train.json", _json(GOOD_ROWS)), lambda t: load_instructions(str(t / "train.json")), DataError
    ),
    "data JSON Lines": Reader(
        _file("train.jsonl", lambda p: p.write_text("\n".join(map(json.dumps, GOOD_ROWS)))),
        lambda t: load_instructions(str(t / "train.jsonl")),
        DataError,
    ),
    "data Parquet": Reader(
        _file("train.parquet", _table(GOOD_ROWS)), lambda t: load_instructions(str(t / "train.parquet")), DataError
    ),
    "data CSV": Reader(
        _file("train.csv", _table(GOOD_ROWS)), lambda t: load_instructions(str(t / "train.csv")), DataError
    ),
    "client file": Reader(_client_folder, lambda t: load_clients(str(t / "clients")), DataError),
    "questions JSON": Reader(
        _file("q.json", _json(GOOD_QUESTIONS)), lambda t: load_questions(t / "q.json"), EvalDataError
    ),
    "questions JSON Lines": Reader(
        _file("q.jsonl", lambda p: p.write_text(json.dumps(GOOD_QUESTIONS[0]))),
        lambda t: load_questions(t / "q.jsonl"),
        EvalDataError,
    ),
    "questions Parquet": Reader(
        _file("q.parquet", _table(GOOD_QUESTIONS)), lambda t: load_questions(t / "q.parquet"), EvalDataError
    ),
    "questions CSV": Reader(
        _file("q.csv", _table([{**GOOD_QUESTIONS[0], "choices": None}])),
        lambda t: load_questions(t / "q.csv"),
        EvalDataError,
    ),
    "metrics.jsonl": Reader(_run_file("metrics.jsonl"), _report, ReportError),
    "config.toml": Reader(_run_file("config.toml"), _report, ReportError, frozenset({"empty", "a dangling link"})),
    # a client.json or spectra.json that is not there (a dangling link) is a run that saved none: left out
    "client.json": Reader(_run_file("client.json"), _report, ReportError, frozenset({"a dangling link"})),
    "spectra.json": Reader(_run_file("spectra.json"), _report, ReportError, frozenset({"a dangling link"})),
    "adapter_config.json": Reader(
        lambda t: write_adapter_files(t / "adapter") / CONFIG_NAME, lambda t: read_adapter(t / "adapter"), AdapterError
    ),
    "adapter_model.safetensors": Reader(
        lambda t: write_adapter_files(t / "adapter") / WEIGHTS_NAME, lambda t: read_adapter(t / "adapter"), AdapterError
    ),
}
# A CSV cannot hold a list of choices: its questions fail as records, which the sweep below also checks.
GOOD_READERS = [name for name in READERS if name != "questions CSV"]


def replace_with(target: Path, write: Callable[[Path], None]) -> None:
    if target.is_dir() and not target.is_symlink():
        raise AssertionError(f"{target} is a directory")
    target.unlink()
    write(target)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "not UTF-8": lambda p: p.write_bytes(b'[{"instruction": "caf\xe9", "output": "\xff\xfe"}]\n'),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-7]),  # a write cut short, mid-row
    "garbage": lambda p: p.write_bytes(bytes(range(256)) * 4),
    "deeply nested": lambda p: p.write_text("[" * 100_000),
    "a huge number": lambda p: p.write_text("1" * 5000),
    "a directory": lambda p: p.mkdir(),
    "a FIFO": lambda p: os.mkfifo(p),
    "a symbolic link loop": lambda p: p.symlink_to(p.name),
    "a dangling link": lambda p: p.symlink_to(p.name + ".gone"),
}


def assert_names(error: BaseException, path: Path) -> None:
    """One line that names the file: its full path, or its folder and its name."""
    message = str(error)
    assert "\n" not in message, message
    assert str(path) in message or (str(path.parent) in message and path.name in message), (message, path)


@pytest.mark.parametrize("reader", GOOD_READERS)
def test_each_reader_reads_its_good_file(tmp_path, reader):
    READERS[reader].setup(tmp_path)
    assert READERS[reader].read(tmp_path) is not None


@pytest.mark.parametrize("damage", [*DAMAGE, "empty"])
@pytest.mark.parametrize("reader", GOOD_READERS)
def test_a_damaged_file_is_a_one_line_error_naming_it(tmp_path, reader, damage):
    r = READERS[reader]
    target = r.setup(tmp_path)
    if damage == "truncated":
        DAMAGE[damage](target)
    else:
        replace_with(target, DAMAGE.get(damage, lambda p: p.write_bytes(b"")))
    if damage in r.harmless:
        r.read(tmp_path)
        return
    with no_hang(), pytest.raises(r.error) as e:
        r.read(tmp_path)
    assert_names(e.value, target)


@pytest.mark.skipif(ROOT, reason="root reads anything")
@pytest.mark.parametrize("reader", GOOD_READERS)
def test_an_unreadable_file_is_a_one_line_error_naming_it(tmp_path, reader):
    r = READERS[reader]
    target = r.setup(tmp_path)
    target.chmod(0)
    with pytest.raises(r.error) as e:
        r.read(tmp_path)
    assert_names(e.value, target)


@given(data=st.binary(max_size=300))
@SWEEP
def test_any_bytes_are_read_or_refused_by_name(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("bytes")
    for name in GOOD_READERS:
        r = READERS[name]
        (tmp / name).mkdir()
        target = r.setup(tmp / name)
        target.write_bytes(data)
        try:
            r.read(tmp / name)
        except r.error as e:
            assert_names(e, target)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
JSON_READERS = ["data JSON", "client file", "questions JSON", "client.json", "spectra.json", "adapter_config.json"]


@given(value=JSON_VALUES, wrap=st.booleans())
@SWEEP
def test_any_json_document_is_read_or_refused_by_name(tmp_path_factory, value, wrap):
    """Any JSON document (a number, a dict, a list of anything) where a reader expects its own shape."""
    tmp = tmp_path_factory.mktemp("json")
    for name in JSON_READERS:
        r = READERS[name]
        (tmp / name).mkdir()
        target = r.setup(tmp / name)
        target.write_text(json.dumps([value] if wrap else value))
        try:
            r.read(tmp / name)
        except r.error as e:
            assert_names(e, target)


# --- rows and records ------------------------------------------------------------------------------------------------


ROW_KEYS = ["instruction", "input", "output", "response", "context", "category", "class", "conversations"]
QUESTION_KEYS = ["question", "choices", "answer", "subject", "instruction", "input", "output", "class"]


def mutated(good: dict, keys: list[str]):
    """``good`` with some keys dropped and some set to any JSON value."""
    return st.tuples(
        st.sets(st.sampled_from(sorted(good))), st.dictionaries(st.sampled_from(keys), JSON_VALUES, max_size=3)
    ).map(lambda t: {**{k: v for k, v in good.items() if k not in t[0]}, **t[1]})


@given(rows=st.lists(mutated(GOOD_ROWS[0], ROW_KEYS), min_size=1, max_size=3))
@SWEEP
def test_instruction_rows_with_missing_or_odd_fields(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("rows") / "train.json"
    path.write_text(json.dumps(rows))
    try:
        ds = load_instructions(str(path))
    except DataError as e:
        event("refused")
        assert_names(e, path)
        return
    event("loaded")
    assert all(isinstance(ds[0][c], str) for c in ("instruction", "input", "output", "category"))


@given(record=mutated(GOOD_QUESTIONS[0], QUESTION_KEYS))
@SWEEP
def test_question_records_with_missing_or_odd_fields(record):
    try:
        [q] = questions_from_records([record], "q.json")
    except EvalDataError as e:
        event("refused")
        assert str(e).startswith("q.json: record 0: ") and "\n" not in str(e)
        return
    event("loaded")
    assert 2 <= len(q.options) <= 26 and 0 <= q.answer < len(q.options)
    assert all(isinstance(x, str) for x in (q.subject, q.question, *q.options))
    ev.mmlu_prompt(q)  # every option gets its letter


def cais(choices, answer) -> dict:
    return {"question": "q?", "subject": "s", "choices": choices, "answer": answer}


def paper(options: list[str], letter: str) -> dict:
    listed = ", ".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
    return {"instruction": "x", "input": f"Question: q? Options: {listed}", "output": f"The answer is: {letter}. x"}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (cais([], 0), "fewer than two options (0)"),
        (cais(["a"], 0), "fewer than two options (1)"),
        (cais([f"o{i}" for i in range(27)], 0), "27 options, more than the 26 letters A to Z can name"),
        (cais(["a", "b", "c", "d"], 4), "answer 4 (E) is outside the 4 options (A to D)"),
        (cais(["a", "b", "c", "d"], -1), "answer -1 is outside the 4 options"),
        (cais(["a", "b", "c", "d"], 99), "answer 99 is outside the 4 options"),
        (cais(["a", "b", "c", "d"], "E"), "answer 4 (E) is outside the 4 options"),
        (cais(["a", "b"], "b"), "'answer' must be an option index or letter, got 'b'"),
        (cais(["a", "b"], True), "'answer' must be an option index or letter"),
        (cais(["a", None], 0), "choice 1 is missing, expected text"),
        (cais(["a", ["b"]], 0), "choice 1 is a list, expected text"),
        (cais({"a": 1, "b": 2}, 0), "'choices' must be a list of options, got a dict"),
        ({**cais(["a", "b"], 0), "question": ["q"]}, "'question' is a list, expected text"),
        ({**cais(["a", "b"], 0), "subject": {"s": 1}}, "'subject' is a dict, expected text"),
        (paper(["a", "b", "c", "d"], "E"), "answer 4 (E) is outside the 4 options (A to D)"),
        (paper(["a"], "A"), "fewer than two options (1)"),
        ({**paper(["a", "b"], "A"), "input": 7}, "input has no 'Options"),
        ({**paper(["a", "b"], "A"), "output": None}, "'output' is missing, expected text"),
        ({**paper(["a", "b"], "A"), "class": ["x"]}, "'class' is a list, expected text"),
    ],
)
def test_questions_need_two_to_26_options_and_an_answer_among_them(record, message):
    with pytest.raises(EvalDataError) as e:
        questions_from_records([cais(["a", "b"], 0), record], "q.json")
    assert str(e.value).startswith("q.json: record 1: ") and message in str(e.value), str(e.value)


def test_26_options_are_lettered_to_z():
    [q] = questions_from_records([cais([f"o{i}" for i in range(26)], "Z")])
    assert q.answer == 25 and "Y. o24, Z. o25\n" in ev.mmlu_prompt(q)


# --- the run directory ---------------------------------------------------------------------------------------------


def good_record(run: Path, line: int = 2) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[line - 1])


def write_record(run: Path, record, line: int = 2) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[line - 1] = json.dumps(record)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


FIELD_VALUES = st.one_of(JSON_VALUES, st.sampled_from([math.nan, math.inf, -1, 0, 2.5, 10**20, "0.9", {}, []]))
RECORD_KEYS = ["round", "branch", "method", "threshold", "ranks", "communication", "evaluation", "server_seconds"]


NESTED_KEYS = [
    "evaluation.accuracy",
    "evaluation.n_questions",
    "evaluation.heldout_loss",
    "communication.eff_e4",
    "communication.total_download_bytes",
]


@given(
    drop=st.sets(st.sampled_from(RECORD_KEYS), max_size=2),
    change=st.dictionaries(st.sampled_from(RECORD_KEYS + NESTED_KEYS), FIELD_VALUES, max_size=2),
    line=st.sampled_from([1, 2, 6]),
)
@SWEEP
def test_metrics_records_with_missing_or_odd_fields(tmp_path_factory, drop, change, line):
    """A record the checks let through renders (tables and text); any other names its line and field."""
    run = make_run(tmp_path_factory.mktemp("records") / "run")
    record = {k: v for k, v in good_record(run, line).items() if k not in drop}
    for key, value in change.items():
        outer, _, inner = key.partition(".")
        if inner and isinstance(record.get(outer), dict):
            record[outer][inner] = value
        elif not inner:
            record[key] = value
    write_record(run, record, line)
    try:
        runs = [load_run(run)]
    except ReportError as e:
        event("refused")
        assert str(e).startswith(f"{run / 'metrics.jsonl'}:{line}: ") or "no finished round" in str(e), str(e)
        assert "\n" not in str(e)
        return
    event("rendered")
    build_report(runs, plots=False)


CONFIG_KEYS = {
    "model": ["name", "dtype"],
    "data": ["train", "clients", "max_examples_per_client", "cutoff"],
    "lora": ["ranks", "alpha_per_rank", "target_modules"],
    "train": ["max_steps", "epochs", "batch_size", "micro_batch_size", "lr"],
    "federation": ["rounds", "scheme", "methods", "thresholds", "florist_e_tolerance"],
    "eval": ["questions", "limit", "mode", "heldout"],
}
TOML_VALUES = st.recursive(
    st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=4), inner, max_size=2),
    max_leaves=6,
)


@given(
    settings_=st.dictionaries(
        st.sampled_from([f"{s}.{k}" for s, ks in CONFIG_KEYS.items() for k in ks]), TOML_VALUES, max_size=4
    ),
    section=st.sampled_from([None, *CONFIG_KEYS]),
    section_value=TOML_VALUES,
)
@SWEEP
def test_config_toml_with_odd_settings(tmp_path_factory, settings_, section, section_value):
    """Any value under the settings the report reads (or a section that is not a table): rendered or refused."""
    run = make_run(tmp_path_factory.mktemp("config") / "run")
    config: dict = {}
    for key, value in settings_.items():
        outer, inner = key.split(".")
        config.setdefault(outer, {})[inner] = value
    if section is not None and not isinstance(section_value, dict):
        config[section] = section_value
    (run / "config.toml").write_text(tomli_w.dumps(config))
    try:
        runs = [load_run(run)]
    except ReportError as e:
        event("refused")
        assert str(e).startswith(f"{run / 'config.toml'}: ") and "\n" not in str(e), str(e)
        return
    event("rendered")
    build_report(runs, plots=False)


@pytest.mark.parametrize(
    "spectra",
    [{Q_PROJ: [0.0, 0.0]}, {Q_PROJ: []}, {Q_PROJ: [3.0]}, {Q_PROJ: [1.0, 2.0, 3.0]}, {Q_PROJ: [1e300, 1e-300, 0]}],
    ids=["zeros", "empty", "one value", "ascending", "extremes"],
)
def test_odd_but_valid_spectra_plot(tmp_path, spectra):
    run = make_run(tmp_path / "run")
    (run / "rounds" / "001" / "florist@0.80" / "spectra.json").write_text(json.dumps(spectra))
    plot_spectra(load_run(run))


def test_a_damaged_aggregation_json_does_not_stop_the_report(tmp_path):
    """The report reads metrics.jsonl, never a branch's aggregation.json: garbage there changes nothing."""
    run = make_run(tmp_path / "run")
    (run / "rounds" / "001" / "florist@0.80" / "aggregation.json").write_bytes(b"\xff{not json")
    result = CliRunner().invoke(app, ["report", str(run), "--no-plots"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("damage", "shown"),
    [
        (lambda run: (run / "metrics.jsonl").write_bytes(b"\xff\xfe\n"), "metrics.jsonl: not UTF-8 text"),
        (lambda run: write_record(run, {**good_record(run), "ranks": []}), "metrics.jsonl:2: ranks is [], expected"),
        (lambda run: (run / "config.toml").write_text("lora = 3\n"), "config.toml: lora is 3, expected a [lora] table"),
        (
            lambda run: (run / "rounds/001/clients/shared/client_0/client.json").write_text("[1, 2]"),
            "client.json: expected a JSON object, found a list",
        ),
    ],
)
def test_report_cli_refuses_a_damaged_run_in_one_line_and_writes_nothing(tmp_path, damage, shown):
    run = make_run(tmp_path / "run")
    damage(run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = CliRunner().invoke(app, ["report", str(run), "--no-plots"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"florist: {run}") and shown in lines[0], result.output
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_run_directories_in_a_symlink_loop(tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    for path in (tmp_path / "loop", tmp_path / "loop" / "run"):
        with pytest.raises(ReportError, match="Too many levels of symbolic links") as e:
            load_run(path)
        assert_names(e.value, path)


# --- where the report writes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "plots", "message"),
    [
        (lambda out: (out / "report.md").mkdir(parents=True), False, "report.md: exists and is a directory"),
        (lambda out: (out.mkdir(), (out / "plots").write_text("x")), True, "plots: exists and is not a directory"),
        (
            lambda out: (out / "plots" / "run-tradeoff.png").mkdir(parents=True),
            True,
            "run-tradeoff.png: exists and is a directory",
        ),
        (lambda out: out.write_text("x"), False, "out: exists and is not a dir"),
        (lambda out: (out.write_text("x"), out / "deeper" / "still")[1], False, "out: exists and is not a dir"),
        (lambda out: (out.mkdir(), (out / "report.md").symlink_to("report.md")), False, "Too many levels"),
    ],
    ids=[
        "report.md a directory",
        "plots a file",
        "a plot a directory",
        "output a file",
        "a file above the output",
        "report.md a loop",
    ],
)
def test_report_targets_are_checked_before_anything_is_written(tmp_path, block, plots, message):
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    deeper = block(out)  # where the report is asked to go, when not out itself
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ReportError, match=message) as e:
        write_report([run], deeper if isinstance(deeper, Path) else out, plots=plots)
    assert "\n" not in str(e.value)
    assert sorted(tmp_path.rglob("*")) == before  # not one plot, not a temporary file


# --- question lengths ------------------------------------------------------------------------------------------------


class Untouchable(torch.nn.Module):
    """A model whose config says how long its context is, and which must never be run."""

    def __init__(self, context: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"max_position_embeddings": context})()

    def forward(self, *args, **kwargs):
        raise AssertionError("a question longer than the context reached the model")


@pytest.mark.parametrize(
    "protocol, mode", [("loglik", "letter"), ("loglik", "option"), ("loglik", "answer"), ("generate", "letter")]
)
def test_questions_longer_than_the_context_are_refused_before_any_forward_pass(protocol, mode):
    tokenizer = models.tiny_llama(0)[1]
    short = Question("s", "Is water wet?", ["yes", "no"], 0, where="q.json: record 0")
    long = Question("s", "word " * 3000, ["yes", "no"], 1, where="q.json: record 1")
    with pytest.raises(EvalDataError, match=r"^q.json: record 1: the prompt.* is \d+ tokens, over the 512 the model"):
        ev.evaluate(Untouchable(512), tokenizer, [short, long], mode=mode, protocol=protocol, progress=False)


def test_context_limit_is_the_smaller_of_model_and_tokenizer():
    model, tokenizer = models.tiny_llama(0)
    assert ev.context_limit(model, tokenizer) == 1024  # the tokenizer states no limit of its own
    tokenizer.model_max_length = 300
    assert ev.context_limit(model, tokenizer) == 300
    tokenizer.model_max_length = int(1e30)  # transformers' "no limit"
    assert ev.context_limit(torch.nn.Linear(1, 1), tokenizer) is None


def test_heldout_examples_longer_than_the_context_are_refused():
    with pytest.raises(EvalDataError, match="held-out example 1: the example is 600 tokens, over the 512"):
        ev.heldout_loss(
            Untouchable(512),
            models.tiny_llama(0)[1],
            [{"input_ids": [1] * 5}, {"input_ids": [1] * 600}],
            progress=False,
        )


# --- florist eval's adapter -----------------------------------------------------------------------------------------


def poisoned(value: float, factor: str = "B") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    (B if factor == "B" else A)[1, 1] = value
    return {f"base_model.model.{Q_PROJ}.lora_A.weight": A, f"base_model.model.{Q_PROJ}.lora_B.weight": B}


def run_eval_with_adapter(tmp_path: Path):
    (tmp_path / "q.json").write_text(json.dumps(GOOD_QUESTIONS))
    return CliRunner().invoke(app, ["eval", "--mmlu", str(tmp_path / "q.json"), "--adapter", str(tmp_path / "adapter")])


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: write_adapter_files(d, poisoned(math.nan)), f"module {Q_PROJ}: lora_B contains NaN or Inf"),
        (lambda d: write_adapter_files(d, poisoned(-math.inf, "A")), f"module {Q_PROJ}: lora_A contains NaN or Inf"),
        (lambda d: (write_adapter_files(d), (d / WEIGHTS_NAME).write_bytes(b"")), "not a valid safetensors file"),
        (lambda d: (write_adapter_files(d), truncated(d / WEIGHTS_NAME)), "not a valid safetensors file"),
        (
            lambda d: (write_adapter_files(d), (d / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 2) + b"{}")),
            "holds no LoRA tensors",
        ),
        (lambda d: (d.parent.mkdir(exist_ok=True), d.symlink_to(d.name)), "Too many levels of symbolic links"),
    ],
    ids=["NaN", "Inf", "empty safetensors", "truncated safetensors", "no tensors", "a symlink loop"],
)
def test_eval_refuses_a_damaged_adapter_before_loading_the_model(tmp_path, monkeypatch, make, message):
    def fails(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a damaged adapter")

    monkeypatch.setattr(models, "load_model", fails)
    make(tmp_path / "adapter")
    result = run_eval_with_adapter(tmp_path)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"florist: --adapter {tmp_path / 'adapter'}"), result.output
    assert message in lines[0], result.output


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {
                "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.ones(2, 64),
                "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.ones(64, 2),
            },
            "module model.layers.7.self_attn.q_proj: not in the model",
        ),
        (
            {
                f"base_model.model.{Q_PROJ}.lora_A.weight": torch.ones(2, 128),
                f"base_model.model.{Q_PROJ}.lora_B.weight": torch.ones(64, 2),
            },
            f"module {Q_PROJ}: updates a 64x128 weight, the model's is 64x64",
        ),
        (None, f"module {Q_PROJ}: not among the config's target_modules"),
    ],
    ids=["a module the model lacks", "another shape", "a module the config does not target"],
)
def test_eval_refuses_an_adapter_of_another_model(tmp_path, monkeypatch, tensors, message):
    """Weights PEFT would drop with a warning (leaving the base model's score) or fail on in many lines."""
    monkeypatch.setattr(models, "load_model", lambda name=None, **kw: models.tiny_llama(seed=0))
    write_adapter_files(tmp_path / "adapter", tensors, targets=("q_proj",) if tensors else ("v_proj",))
    result = run_eval_with_adapter(tmp_path)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_question_and_data_paths_in_a_symlink_loop(tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    for path in (tmp_path / "loop", tmp_path / "loop" / "q.json"):
        with pytest.raises(EvalDataError, match="Too many levels of symbolic links") as e:
            load_questions(path)
        assert_names(e.value, path)
        with pytest.raises(DataError, match="Too many levels of symbolic links") as e:
            load_instructions(str(path))
        assert_names(e.value, path)
        with pytest.raises(DataError, match="Too many levels of symbolic links"):
            load_clients(str(path), 2)


# --- quiet mistakes on the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "summary", "--data", "{rows}", "--clients", "0"], "the number of clients must be at least 1, got 0"),
        (["data", "summary", "--data", "{rows}", "--clients", "-3"], "the number of clients must be at least 1"),
        (["data", "summary", "--data", "{rows}", "--clients", "5", "--partition", "iid"], "4 rows cannot fill 5"),
        (["data", "summary", "--data", "{folder}", "--clients", "0"], "the number of clients must be at least 1"),
        (["data", "summary", "--data", "{rows}", "--clients", "2", "--alpha", "inf"], "alpha must be positive and"),
        (["data", "summary", "--data", "{rows}", "--clients", "2", "--alpha", "nan"], "alpha must be positive and"),
        (["demo", "--layers", "-1"], "--layers -1: choose 1 to 22 (tinyllama has 22 layers)"),
        (["demo", "--layers", "0"], "--layers 0: choose 1 to 22"),
        (["demo", "--layers", "23"], "--layers 23: choose 1 to 22"),
        (["demo", "--model", "llama-7b", "--layers", "1000000"], "--layers 1000000: choose 1 to 32"),
        (["demo", "--thresholds", "abc"], "--thresholds 'abc': florist's τ must be T, T1,T2,... or start:stop:step"),
        (["demo", "--thresholds", ""], "--thresholds '': florist's τ must be T, T1,T2,... or start:stop:step"),
        (["demo", "--thresholds", "0.9,1.5"], "--thresholds '0.9,1.5': florist's τ must hold taus in (0, 1]"),
        (["demo", "--thresholds", "0"], "must hold taus in (0, 1]"),
        (["demo", "--thresholds", "nan"], "must hold taus in (0, 1]"),
        (["demo", "--thresholds", "0.9,0.90"], "gives tau 0.90 twice"),
        (["demo", "--seed", "-1"], "--seed -1: expected 0 to 2^64 - 1"),
        (["demo", "--model", "gpt-9"], "--model 'gpt-9': choose from"),
    ],
)
def test_command_line_mistakes_are_one_line_errors(tmp_path, args, message):
    (tmp_path / "rows.json").write_text(json.dumps(GOOD_ROWS))
    _client_folder(tmp_path)
    args = [a.format(rows=tmp_path / "rows.json", folder=tmp_path / "clients") for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("florist: ") and message in lines[0], result.output
