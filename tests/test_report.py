"""The report: its table (marks, FLoRIST-O/E), its files and its errors, on run directories written by hand; and a
method registered here, which the report draws and tables from its declaration alone."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from matplotlib.colors import to_rgba
from typer.testing import CliRunner

from florist.cli import app
from florist.communication import RoundCommunication
from florist.methods import Method, Style, Sweep, register, unregister
from florist.report import (
    ReportError,
    cut_values,
    load_run,
    load_spectra,
    pareto_front,
    plot_ranks,
    plot_tradeoff,
    round_series,
    spectra_modules,
    split_module,
    write_report,
)
from florist.results import ResultRow, is_pick, paper_table, ranks_in_column
from florist.server import RoundRecord

LAYERS = 3
MODULES = [f"model.layers.{i}.self_attn.{k}" for i in range(LAYERS) for k in ("q_proj", "v_proj")]
CLIENTS = 4
SHAPE = (64, 64)  # every adapted matrix is 64 x 64 in the fake model
SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05]  # cumulative energy 0.750, 0.938, 0.984, 0.996, ...

# accuracy and held-out loss per branch; FLoRIST at tau 0.90 is best and 0.80 is within 1 point of it
SCORES = {
    "fedit": (0.300, 2.10),
    "flora": (0.280, 2.20),
    "flexlora": (0.290, 2.15),
    "ffa": (0.250, 2.40),
    "florist@0.80": (0.305, 2.12),
    "florist@0.90": (0.310, 2.05),
    "florist@1.00": (0.280, 2.20),
}


def _communication(method: str, rank: float) -> dict:
    """What RoundCommunication would record for ``CLIENTS`` clients sending rank-``rank`` pairs on every module."""
    m, n = SHAPE
    per_rank = m if method == "ffa" else m + n
    up = [16 * per_rank * len(MODULES)] * CLIENTS
    down = [int(rank * per_rank * len(MODULES))] * CLIENTS
    units = 0.5 if method == "ffa" else 1.0
    return RoundCommunication(method, up, down, 4, units * rank * len(MODULES)).to_dict()


def _record(round_number: int, branch: str, scores: tuple[float, float], accuracy: bool = True) -> dict:
    method, _, tau = branch.partition("@")
    threshold = float(tau) if tau else None
    rank = {"flora": 16 * CLIENTS, "florist": {0.80: 2, 0.90: 3, 1.00: 8}.get(threshold, 16)}.get(method, 16)
    ranks = {name: rank + (i % 2 if method == "florist" and threshold < 1 else 0) for i, name in enumerate(MODULES)}
    evaluation = {"heldout_loss": scores[1] - 0.01 * (round_number - 1)}
    if accuracy:
        evaluation.update(accuracy=scores[0] + 0.005 * (round_number - 1), micro_accuracy=scores[0], n_questions=400)
    return RoundRecord(
        round=round_number,
        branch=branch,
        method=method,
        threshold=threshold,
        participants=list(range(CLIENTS)),
        ranks=ranks,
        communication=_communication(method, sum(ranks.values()) / len(MODULES)),
        evaluation=evaluation,
        train={"final_loss_mean": 1.0, "tokens": 1000, "seconds": 2.0},
        server_seconds=0.01,
    ).to_dict()


def make_run(
    path: Path, rounds: int = 1, accuracy: bool = True, spectra: bool = True, scores: dict = SCORES, settings: str = ""
) -> Path:
    """A run directory as ``florist run`` writes it, by hand: config.toml, metrics.jsonl, spectra, client.json.

    ``scores``: (accuracy, held-out loss) per branch; ``settings``: more lines of config.toml's [federation]."""
    path.mkdir(parents=True)
    (path / "config.toml").write_text(
        'seed = 0\noutput = "x"\n[data]\ntrain = "../shared/data/dolly"\nclients = 4\n[lora]\nranks = [16]\n'
        '[federation]\nthresholds = "0.80,0.90,1.00"\nflorist_e_tolerance = 0.01\n'
        f"rounds = {rounds}\n{settings}"
    )
    base = {"heldout_loss": 2.5, **({"accuracy": 0.25, "micro_accuracy": 0.25, "n_questions": 400} if accuracy else {})}
    lines = [RoundRecord(0, "base", "base", None, [], {}, {}, base, {}, 0.0).to_dict()]
    for r in range(1, rounds + 1):
        lines += [_record(r, branch, branch_scores, accuracy) for branch, branch_scores in scores.items()]
        if spectra:
            d = path / "rounds" / f"{r:03d}" / "florist@0.80"
            d.mkdir(parents=True)
            (d / "spectra.json").write_text(json.dumps({name: SPECTRUM for name in MODULES}))
        for k in range(CLIENTS):
            c = path / "rounds" / f"{r:03d}" / "clients" / "shared" / f"client_{k}"
            c.mkdir(parents=True)
            (c / "client.json").write_text(json.dumps({"client": k, "steps": 2, "tokens": 500, "seconds": 5.0}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table after ``heading``, header and rule left out."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in block[2:]]


def test_table_marks_best_bold_and_second_italic(tmp_path):
    report = write_report([make_run(tmp_path / "run")], plots=False).read_text()
    rows = _table_rows(report, "### Results")
    names = [r[0] for r in rows]
    assert names == ["FedIT", "FLoRA", "FlexLoRA", "FFA-LoRA", "FLoRIST-O", "FLoRIST-E"]
    by_name = {r[0]: r for r in rows}
    # FLoRIST-O is tau 0.90 (best accuracy), FLoRIST-E tau 0.80 (within 1 point, less download)
    assert by_name["FLoRIST-O"][1] == "0.90" and by_name["FLoRIST-E"][1] == "0.80"
    assert by_name["FLoRIST-O"][2] == "**31.00**"  # accuracy: best bold
    assert by_name["FLoRIST-E"][2] == "*30.50*"  # second italic
    assert by_name["FedIT"][2] == "30.00"
    assert by_name["FLoRIST-O"][3] == "**2.0500**"  # held-out loss: lowest is best
    assert by_name["FedIT"][3] == "*2.1000*"
    # Eff: FLoRIST-E sends the least rank, then FLoRIST-O; FFA-LoRA's B-only download comes third
    assert by_name["FLoRIST-E"][4].startswith("**") and by_name["FLoRIST-O"][4].startswith("*")
    assert not by_name["FFA-LoRA"][4].startswith("*") and not by_name["FLoRA"][4].startswith("*")


def test_sweep_table_lists_every_tau_unmarked_against_the_picks(tmp_path):
    report = write_report([make_run(tmp_path / "run")], plots=False).read_text()
    sweep = _table_rows(report, "### FLoRIST τ sweep")
    assert [r[1] for r in sweep] == ["1.00", "0.90", "0.80"]
    assert all(r[0] == "FLoRIST" for r in sweep)
    assert not any("*" in cell for row in sweep for cell in row)


def test_writes_report_and_plots_into_the_first_run_directory(tmp_path):
    run = make_run(tmp_path / "run", rounds=2)
    path = write_report([run])
    assert path == run / "report.md"
    plots = sorted(p.name for p in (run / "plots").iterdir())
    assert plots == ["run-ranks.png", "run-rounds.png", "run-spectra.png", "run-tradeoff.png"]
    for p in (run / "plots").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = path.read_text()
    for p in plots:
        assert f"](plots/{p})" in text  # every plot is linked relative to report.md
    assert not list(run.rglob("*.tmp"))


def test_single_round_run_has_no_rounds_plot_and_missing_spectra_no_spectra_plot(tmp_path):
    run = make_run(tmp_path / "run", rounds=1, spectra=False)
    write_report([run])
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["run-ranks.png", "run-tradeoff.png"]


def test_several_runs_get_a_section_each_and_a_combined_table(tmp_path):
    a, b = make_run(tmp_path / "a" / "run"), make_run(tmp_path / "b" / "run", accuracy=False)
    out = tmp_path / "report"
    text = write_report([a, b], output=out).read_text()
    assert text.count("\n## run") == 2  # same folder names: both sections, plots kept apart
    assert (out / "plots" / "run-tradeoff.png").exists() and (out / "plots" / "run-2-tradeoff.png").exists()
    combined = _table_rows(text, "## All runs")
    assert len(combined) == 12 and [r[1] for r in combined[:6]] == [r[1] for r in combined[6:]]
    # without accuracy, FLoRIST-O/E are picked on held-out loss
    second = {r[1]: r for r in combined[6:]}
    assert second["FLoRIST-O"][2] == "0.90" and second["FLoRIST-O"][3] == ""
    assert second["FLoRIST-O"][4] == "**2.0500**"


def test_summary_compares_florist_o_with_the_best_baseline_and_fedit_eff(tmp_path):
    text = write_report([make_run(tmp_path / "run")], plots=False).read_text()
    line = next(x for x in text.splitlines() if x.startswith("- accuracy: FLoRIST-O"))
    assert "FedIT 30" in line and "at least as good" in line and "4.57× FedIT's" in line
    assert "95% interval is ±4.2 points" in text  # 400 questions at chance
    # the picks follow accuracy; on held-out loss FLoRIST's own best tau is compared
    assert "- held-out loss: FLoRIST's best τ on held-out loss (τ=0.90) 2.05 vs best baseline FedIT 2.1" in text


def test_round_series_starts_at_the_base_model(tmp_path):
    run = load_run(make_run(tmp_path / "run", rounds=3))
    series = round_series(run, "accuracy")
    assert series["FedIT"] == [(0, 25.0), (1, pytest.approx(30.0)), (2, pytest.approx(30.5)), (3, pytest.approx(31.0))]
    assert any(name.startswith("FLoRIST-O (τ=0.90)") for name in series)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such run directory"),
        (lambda p: p.mkdir(), "not a run directory (no metrics.jsonl)"),
        (lambda p: p.write_text("x"), "not a directory"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("{oops\n")), "metrics.jsonl:1: not valid JSON"),
        (
            lambda p: (
                p.mkdir(),
                (p / "metrics.jsonl").write_text(
                    json.dumps(RoundRecord(0, "base", "base", None, [], {}, {}, {}, {}, 0.0).to_dict()) + "\n"
                ),
            ),
            "no finished round yet",
        ),
    ],
)
def test_bad_run_directories_are_one_line_errors_and_write_nothing(tmp_path, setup, message):
    bad = tmp_path / "bad"
    setup(bad)
    good = make_run(tmp_path / "good")
    with pytest.raises(ReportError, match=re.escape(message)):
        write_report([good, bad])
    assert not (good / "report.md").exists() and not (good / "plots").exists()


def test_cli_writes_the_report_and_reports_errors_in_one_line(tmp_path):
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    ok = CliRunner().invoke(app, ["report", str(run), "--output", str(out), "--no-plots"])
    assert ok.exit_code == 0, ok.output
    assert "FLoRIST-O" in (out / "report.md").read_text() and not (out / "plots").exists()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert missing.output.strip().splitlines() == [f"florist: {tmp_path / 'nope'}: no such run directory"]


def test_ranks_in_column_ties_share_a_mark_and_none_is_skipped():
    assert ranks_in_column([1.0, 3.0, None, 3.0, 2.0], True) == ["", "best", "", "best", "second"]
    assert ranks_in_column([1.0, 3.0, 2.0], False) == ["best", "", "second"]


def test_pareto_front_keeps_points_no_other_beats():
    points = [(1.0, 30.0), (2.0, 29.0), (3.0, 31.0), (0.5, 25.0), (3.0, 30.5)]
    assert pareto_front(points, higher_is_better=True) == [(0.5, 25.0), (1.0, 30.0), (3.0, 31.0)]
    assert pareto_front([(1.0, 2.0), (2.0, 1.5), (3.0, 1.8)], higher_is_better=False) == [(1.0, 2.0), (2.0, 1.5)]


def test_module_helpers():
    assert split_module("base_model.model.model.layers.12.self_attn.v_proj") == (12, "v_proj")
    assert split_module("lm_head") == (None, "lm_head")
    assert spectra_modules(MODULES) == [MODULES[0], MODULES[-2], MODULES[1], MODULES[-1]]
    assert cut_values([0.8 + 0.01 * i for i in range(21)]) == pytest.approx([0.80, 0.85, 0.90, 0.95, 1.00])
    assert cut_values([0.9, 0.5, 1.0]) == [0.5, 0.9, 1.0]


def _row(tau, accuracy, loss, eff):
    return ResultRow("florist", tau, accuracy, loss, eff, 0.0, 0, 0, 0, 0, f"florist@{tau:.2f}")


def _picks(rows, tolerance=0.01) -> dict[str, float]:
    """The picks paper_table names among ``rows``, by label, as their tau."""
    config = SimpleNamespace(federation=SimpleNamespace(florist_e_tolerance=tolerance))
    return {r.label: r.threshold for r in paper_table(rows, config) if is_pick(r)}


def test_picks_break_accuracy_ties_by_loss_and_trade_accuracy_for_download():
    rows = [
        _row(1.0, 0.30, 2.10, 1.0),
        _row(0.9, 0.30, 2.20, 5.0),
        _row(0.8, 0.295, 2.30, 9.0),
        _row(0.7, 0.25, 2.0, 20.0),
    ]
    # O: tied on accuracy with 0.9, lower loss; E: within 0.01 of the best accuracy, the most Eff (0.7 is too far off)
    assert _picks(rows) == {"FLoRIST-O": 1.0, "FLoRIST-E": 0.8}
    no_questions = [
        _row(t, None, loss, eff) for t, _, loss, eff in [(1.0, 0, 2.1, 1.0), (0.9, 0, 2.105, 5.0), (0.8, 0, 2.5, 9.0)]
    ]
    assert _picks(no_questions) == {"FLoRIST-O": 1.0, "FLoRIST-E": 0.9}  # on loss alone, lower is better


def test_a_tolerance_the_picks_cannot_use_is_a_config_error(tmp_path):
    run = make_run(tmp_path / "run")
    config = run / "config.toml"
    config.write_text(config.read_text().replace("florist_e_tolerance = 0.01", 'florist_e_tolerance = "wide"'))
    with pytest.raises(ReportError, match=re.escape(f"{config}: FLoRIST cannot pick rows under these settings")):
        load_run(run)


# --- a method the report knows from its declaration alone ------------------------------------------------------------


def _positive_values(spec: str) -> tuple[list[float], str]:
    values = [float(x) for x in spec.split(",")]
    return (sorted(values), "") if all(v > 0 for v in values) else ([], "must hold positive values")


class Sharpened(Method):
    """Swept over ρ; its one pick is the best accuracy."""

    name = "sharp"
    display = "Sharp-LoRA"
    order = 5  # between the baselines and FLoRIST
    style = Style(marker="p", colour="#123456", colour_map="plasma")
    sweep = Sweep("ρ", "federation.rho", _positive_values, "--rho", 2.0, "sharpness ρ")

    def picks(self, rows, config):
        own = [r for r in rows if r.method == self.name and r.accuracy is not None]
        return [("Sharp-best", max(own, key=lambda r: r.accuracy))] if own else []

    def describe_picks(self, config):
        return f"Sharp-best (best ρ of {config.federation.rho})"


class Plain(Method):
    """No sweep; ordered before every built-in method."""

    name = "plain"
    display = "Plain-LoRA"
    order = -1
    style = Style(marker="s", colour="#abcdef")


TEST_SCORES = {**SCORES, "plain": (0.29, 2.25), "sharp@2.00": (0.27, 2.30), "sharp@4.00": (0.32, 2.00)}


@pytest.fixture
def declared():
    """The two test methods, registered for one test."""
    methods = [register(Sharpened()), register(Plain())]
    yield methods
    for m in methods:
        unregister(m.name)


def _declared_run(path: Path, **kwargs) -> Path:
    return make_run(path, scores=TEST_SCORES, settings='rho = "2.0,4.0"\n', **kwargs)


def test_a_declared_method_takes_its_place_name_and_sweep_in_the_tables(tmp_path, declared):
    report = write_report([_declared_run(tmp_path / "run")], plots=False).read_text()
    rows = _table_rows(report, "### Results")
    names = ["Plain-LoRA", "FedIT", "FLoRA", "FlexLoRA", "FFA-LoRA", "Sharp-best", "FLoRIST-O", "FLoRIST-E"]
    assert [r[0] for r in rows] == names
    assert rows[5][1:3] == ["4.00", "**32.00**"]  # its pick, marked against the others
    assert "| method | ρ / τ | accuracy (%) |" in report  # the value column is headed by both sweeps' parameters
    sweep = _table_rows(report, "### Sharp-LoRA ρ sweep")
    assert [r[:2] for r in sweep] == [["Sharp-LoRA", "4.00"], ["Sharp-LoRA", "2.00"]]
    assert "- methods: ; ρ = 2.0,4.0; τ = 0.80,0.90,1.00" in report
    assert "\nBaselines, then Sharp-best (best ρ of 2.0,4.0) and " in report  # in the method's own words
    # the summary compares its pick with the best baseline, and Eff with the first method without a sweep
    line = next(x for x in report.splitlines() if x.startswith("- accuracy: Sharp-best (ρ=4.00) 32"))
    assert "vs best baseline FedIT 30" in line and "× Plain-LoRA's" in line


def test_a_declared_method_is_drawn_in_its_style_and_its_sweep_by_value(tmp_path, declared):
    run = load_run(_declared_run(tmp_path / "run"))
    fig = plot_tradeoff(run)
    panel = fig.axes[0]
    points = {c.get_label(): c for c in panel.collections}
    assert tuple(points["Plain-LoRA"].get_facecolor()[0]) == to_rgba("#abcdef")
    swept = points["Sharp-LoRA (colour: ρ)"]
    assert swept.get_cmap().name == "plasma" and sorted(swept.get_array()) == [2.0, 4.0]
    assert {"Sharp-LoRA ρ", "FLoRIST τ"} <= {ax.get_ylabel() for ax in fig.axes}  # a colour bar per sweep
    assert any(t.get_text() == "Sharp-best (ρ=4.00)" for t in panel.texts)  # its pick, ringed and labelled
    titles = {ax.get_title() for ax in plot_ranks(run).axes}
    assert {"Sharp-LoRA q_proj: rank kept", "FLoRIST q_proj: rank kept"} <= titles
    assert "Sharp-best (ρ=4.00)" in round_series(run, "accuracy")


def test_spectra_are_read_from_whichever_branch_saved_them(tmp_path, declared):
    path = _declared_run(tmp_path / "run", spectra=False)
    (path / "rounds" / "001" / "sharp@2.00").mkdir()
    (path / "rounds" / "001" / "sharp@2.00" / "spectra.json").write_text(json.dumps({MODULES[0]: SPECTRUM}))
    assert load_spectra(load_run(path)) == {MODULES[0]: SPECTRUM}


def test_a_record_off_its_method_s_sweep_names_its_line(tmp_path, declared):
    path = _declared_run(tmp_path / "run")
    lines = (path / "metrics.jsonl").read_text().splitlines()
    k = next(i for i, line in enumerate(lines) if '"sharp@2.00"' in line)
    lines[k] = json.dumps({**json.loads(lines[k]), "threshold": -2.0})
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError) as e:
        load_run(path)
    problem = "threshold -2.0 is not a Sharp-LoRA ρ: must hold positive values"
    assert str(e.value) == f"{path / 'metrics.jsonl'}:{k + 1}: {problem}"


def test_a_method_not_registered_follows_the_registered_baselines_by_its_key(tmp_path):
    path = make_run(tmp_path / "run", scores={**SCORES, "mystery": (0.2, 2.6)})
    names = [r[0] for r in _table_rows(write_report([path], plots=False).read_text(), "### Results")]
    assert names == ["FedIT", "FLoRA", "FlexLoRA", "FFA-LoRA", "mystery", "FLoRIST-O", "FLoRIST-E"]
