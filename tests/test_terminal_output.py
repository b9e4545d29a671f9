"""What florist prints, read as a new user's 80-column terminal or a log file gets it: tables that fit with no figure
cut, no library warnings, ``--quiet`` quiet, and plain lines (never a carriage-return frame) when the output is not
a terminal. The commands run in subprocesses with piped output, so the width and the not-a-terminal are real."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from florist.results import ResultRow, TableColumn, fitted_table

# The tiny model stands in for every model a command loads (as tests/test_rundir.py's TINY_CLI does).
TINY_CLI = """
import sys
import florist.models as models
import florist.setup as run_setup
tiny = lambda name=None, dtype="float32", device="cpu": models.tiny_llama(0)
run_setup.load_model = models.load_model = tiny
from florist.cli import app
app(sys.argv[1:], prog_name="florist")
"""

RUN = [
    "data.clients=2",
    "data.max_examples_per_client=4",
    "data.cutoff=64",  # long enough for the held-out answers: the table gets its loss column
    'data.partition="iid"',
    "train.max_steps=1",
    "train.batch_size=2",
    "train.micro_batch_size=2",
    "lora.ranks=[2]",
    'federation.methods=["fedit", "flora", "florist"]',
    'federation.thresholds="0.8,0.9"',
    "federation.rounds=1",
    "eval.limit=4",
]
WIDTH = 80


def florist(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(COLUMNS=str(WIDTH), PYTHONWARNINGS="default", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", TINY_CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def run_args(output: Path, *extra: str) -> list[str]:
    return ["run", "--output", str(output), *[x for o in RUN for x in ("--set", o)], *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run twice, with and without --quiet, into directories whose names are equally long."""
    root = tmp_path_factory.mktemp("terminal")
    return root, florist(*run_args(root / "loud")), florist(*run_args(root / "hush", "--quiet"))


def assert_plain(*texts: str) -> None:
    """No warning of a library, no bar frame, nothing cut."""
    for text in texts:
        assert "\r" not in text
        assert "…" not in text
        for line in text.splitlines():
            assert "Warning" not in line and "deprecated" not in line, line


def table_rows(stdout: str, count: int) -> list[str]:
    """The ``count`` data rows of a printed results table: the lines under the header's rule, rules skipped."""
    lines = stdout.splitlines()
    body = lines[next(k for k, line in enumerate(lines) if set(line.strip()) == {"─"}) + 1 :]
    return [line for line in body if set(line.strip()) != {"─"}][:count]


def test_the_run_table_fits_80_columns_with_every_figure_whole(runs):
    root, loud, _ = runs
    assert_plain(loud.stdout, loud.stderr)
    assert all(cell_len(line) <= WIDTH for line in loud.stdout.splitlines())
    rows = [ResultRow(**r) for r in json.loads((root / "loud" / "results.json").read_text())]
    assert len(rows) == 2 + 2 + 2  # FedIT, FLoRA, the O and E picks, both taus
    for row, line in zip(rows, table_rows(loud.stdout, len(rows)), strict=True):
        figures = [f"{100 * row.accuracy:.2f}", f"{row.heldout_loss:.4f}"]
        figures += [f"{row.upload_bytes / 1e6:.2f}", f"{row.download_bytes / 1e6:.2f}"]
        assert line.split()[-2:] == figures[2:] and all(f in line.split() for f in figures), (figures, line)
    assert "results.md" in loud.stdout  # where the columns that did not fit are


def test_a_log_gets_one_plain_line_per_client_trained_and_per_evaluation(runs):
    _, loud, _ = runs
    lines = loud.stderr.splitlines()
    groups = [line for line in lines if line.startswith("round 1: training 2 clients for ")]
    assert groups, lines
    for client in (0, 1):
        tokenized = [line for line in lines if line.startswith(f"tokenizing client {client}:")]
        assert len(tokenized) == 1 and re.fullmatch(r"tokenizing client \d: 4/4 examples, \d+\.\d s", tokenized[0])
        trained = [line for line in lines if line.startswith(f"round 1 client {client} (shared, r=2):")]
        assert len(trained) == len(groups), lines
        assert all(
            re.fullmatch(r"round 1 client \d \(shared, r=2\): 1/1 steps, loss \d+\.\d{3}, \d+\.\d s", t)
            for t in trained
        )
    scored = [line for line in lines if " scored in " in line]
    assert len(scored) == 1 + 4, lines  # the base model and each branch: fedit, flora, two taus
    assert all(re.search(r": accuracy \d+\.\d\d%, held-out loss \d+\.\d{4}$", line) for line in scored), scored


def test_quiet_prints_the_table_and_nothing_else(runs):
    _, loud, quiet = runs
    assert quiet.stderr == ""
    assert quiet.stdout.replace("hush", "loud") == loud.stdout  # the loud run's stdout is its table alone
    assert "Results:" in quiet.stdout.splitlines()[0]


def test_eval_prints_its_figures_on_lines_that_fit(runs):
    root, _, _ = runs
    adapter = root / "loud" / "rounds" / "001" / "fedit"  # a PEFT adapter of the tiny model
    done = florist("eval", "--builtin", "--limit", "4", "--adapter", str(adapter), "--per-subject")
    assert_plain(done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    assert all(cell_len(line) <= WIDTH for line in lines)
    number = r"\d+\.\d+"
    assert re.fullmatch(rf"accuracy {number} \(macro over \d+ subjects\), micro {number}, scored by answer", lines[0])
    assert re.fullmatch(rf"4 questions in {number} s \({number} questions/s\)", lines[1])
    assert re.fullmatch(r"scoring options: 1/1 batches, \d+\.\d s", done.stderr.strip())


def test_data_summary_fits_80_columns():
    from florist.cli import app

    result = CliRunner().invoke(app, ["data", "summary"], env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == 0, result.output
    assert_plain(result.output)
    assert all(cell_len(line) <= WIDTH for line in result.output.splitlines())
    clients = [int(m[1]) for m in re.finditer(r"^ +\d +(\d+) +\d+\.\d% +\d+ +\S", result.output, re.M)]
    total = re.search(r"^ +all +(\d+) +100% +\d+ *$", result.output, re.M)
    assert len(clients) == 8 and total and sum(clients) == int(total[1]), result.output


def render(table, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    console.print(table)
    return console.export_text().splitlines()


def test_fitted_table_leaves_columns_out_before_it_cuts_a_figure():
    figures = [["method-name", "0.90", "1,234,567,890", "98.76", "12345.67", "1,111,111,111"]] * 3
    columns = [TableColumn(h) for h in ("method", "τ", "params up", "accuracy (%)", "MB up", "params down")]
    for width, shown in ((120, 6), (60, 4), (50, 4), (36, 2)):
        table = fitted_table(columns, figures, width, drop=[[2, 5], [4, 3]])
        lines = render(table, width)
        assert len(table.columns) == shown and all(cell_len(line) <= width for line in lines), (width, lines)
        shown_headers = {column.header.plain for column in table.columns}
        kept = {row[k] for row in figures for k, c in enumerate(columns) if c.header in shown_headers}
        assert kept <= set(" ".join(lines).split()), (width, lines)


def test_fitted_table_wraps_prose_between_words_and_keeps_styled_figures():
    columns = [TableColumn("client"), TableColumn("mix", justify="left", prose=True)]
    rows = [[Text("12,345", style="bold"), "alpha 40%, beta 35%, gamma 25%"]]
    lines = render(fitted_table(columns, rows, 24), 24)
    assert all(cell_len(line) <= 24 for line in lines)
    words = " ".join(lines).split()
    assert "12,345" in words and {"alpha", "40%,", "beta", "35%,", "gamma", "25%"} <= set(words)
