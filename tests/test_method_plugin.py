"""A method declared here, in a test module, with nothing in florist/ edited: it runs through ``florist run`` on the
tiny model on both engines, ``florist report`` and ``florist aggregate``. The proof that a method is one file.

``CoreMean`` trains only a small r × r matrix R between two factors every client holds frozen at one shared draw
(the update is s·B·R·A); clients upload R alone and the server averages it, which is exact because B and A are
shared. ``LocalB`` keeps B on each client and shares only A: B never travels, and a client's B goes on from its own
copy round after round.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from test_federation import TINY_RUN
from typer.testing import CliRunner

import florist.engines.flower_app as flower_app
import florist.setup as run_setup
from florist import run as run_module
from florist.aggregation import AggregationResult, ClientUpdate, ModuleAggregate
from florist.aggregation.base import fold_scaling
from florist.cli import app
from florist.config import load_config
from florist.jobs import ClientMode
from florist.methods import METHODS, Method, Style, register, unregister
from florist.models import tiny_llama


class CoreMean(Method):
    name = "coremean"
    display = "Core-Mean"
    order = 5
    summary = "Trains an r×r core between shared frozen factors and averages it."
    exact = True
    style = Style(marker="P", colour="#17becf")

    def mode(self, round_number: int) -> ClientMode:
        return ClientMode(trains={"R"}, shared={"A", "B"}, core=True)

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float], value=None) -> AggregationResult:
        # every client's pair is (A0, B0 R_k): A0 is shared, so averaging B = B0 R_k is the mean of the updates
        modules = {}
        for name in updates[0].modules:
            factors = [u.modules[name] for u in updates]
            B = sum(w * fold_scaling(f) for f, w in zip(factors, weights))
            modules[name] = ModuleAggregate(A=factors[0].A, B=B)
        return AggregationResult(self.name, modules, weights=list(weights))


class LocalB(Method):
    name = "localb"
    display = "Local-B"
    order = 6
    summary = "Shares and averages A; every client keeps its own B."
    style = Style(marker="X", colour="#bcbd22")

    def mode(self, round_number: int) -> ClientMode:
        return ClientMode(trains={"A", "B"}, keeps={"B"})

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float], value=None) -> AggregationResult:
        modules = {}
        for name in updates[0].modules:
            A = sum(w * u.modules[name].A for u, w in zip(updates, weights))
            B = torch.zeros_like(updates[0].modules[name].B)  # the clients' B never reach the server
            modules[name] = ModuleAggregate(A=A, B=B)
        return AggregationResult(self.name, modules, weights=list(weights))


class Alternate(Method):
    """B in odd rounds under a shared frozen A, then A in even rounds under the global B: one factor travels a round,
    and averaging it is exact because the other is the same on every client."""

    name = "alternate"
    display = "Alternate"
    order = 7
    summary = "Trains B, then A, in turn; averages the one that trained."
    exact = True

    def mode(self, round_number: int) -> ClientMode:
        return ClientMode(trains={"B"}, shared={"A"}) if round_number % 2 else ClientMode(trains={"A"})

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float], value=None) -> AggregationResult:
        modules = {}
        for name in updates[0].modules:
            factors = [u.modules[name] for u in updates]
            if all(torch.equal(f.A, factors[0].A) for f in factors):  # a B round
                modules[name] = ModuleAggregate(
                    A=factors[0].A, B=sum(w * fold_scaling(f) for f, w in zip(factors, weights))
                )
            else:  # an A round: every client holds the global B
                modules[name] = ModuleAggregate(
                    A=sum(w * f.A for f, w in zip(factors, weights)), B=fold_scaling(factors[0])
                )
        return AggregationResult(self.name, modules, weights=list(weights))


@pytest.fixture(autouse=True)
def plugin_methods(monkeypatch):
    tiny = lambda name, dtype, device: tiny_llama(0)  # noqa: E731
    monkeypatch.setattr(run_setup, "load_model", tiny)  # the server's copy, and the in-process clients'
    monkeypatch.setattr(flower_app, "load_model", tiny)  # the Flower ClientApps'
    for m in (CoreMean(), LocalB(), Alternate()):
        register(m)
    yield
    for name in ("coremean", "localb", "alternate"):
        unregister(name)


def run(tmp_path, name, *overrides):
    config = load_config(
        None,
        [
            *TINY_RUN,
            "lora.ranks=[4]",
            "eval.limit=4",
            "federation.rounds=2",
            'federation.methods=["coremean","localb","fedit"]',
            f'output="{tmp_path / name}"',
            *overrides,
        ],
    )
    return run_module.run(config, progress=False, log=lambda m: None)


def records(rundir):
    return [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines()]


def test_methods_lists_a_registered_method_on_one_line():
    out = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    line = next(line for line in out.output.splitlines() if line.startswith("coremean"))
    assert "Core-Mean" in line and "trains R" in line and "uploads R" in line


@pytest.mark.parametrize("engine", ["inprocess", "flower"])
def test_a_method_from_a_test_module_runs_on_both_engines(tmp_path, engine):
    rundir = run(tmp_path, engine, f'engine="{engine}"')
    by_branch = {(r["round"], r["branch"]): r for r in records(rundir)}
    for round_number in (1, 2):
        core, local, fedit = (by_branch[(round_number, b)] for b in ("coremean", "localb", "fedit"))
        # the traffic is what each mode uploads: r² a module for R, A alone when B stays on the client
        modules = len(core["ranks"])
        assert core["communication"]["upload_params"] == [modules * 4 * 4] * 3
        assert core["communication"]["download_params"] == [modules * 4 * 4] * 3
        a_only = sum(4 * 64 for _ in range(modules))  # every tiny module's A is r × 64
        assert local["communication"]["upload_params"] == [a_only] * 3
        assert fedit["communication"]["upload_params"][0] > a_only
        assert core["evaluation"]["accuracy"] is not None
    # the two methods train apart from FedIT (their own modes), each in its own training group
    assert (rundir / "rounds" / "001" / "clients" / "coremean").is_dir()
    assert (rundir / "rounds" / "001" / "clients" / "localb").is_dir()


@pytest.mark.parametrize("engine", ["inprocess", "flower"])
def test_a_mode_that_changes_from_round_to_round(tmp_path, engine):
    """Round 1 trains and uploads B alone, round 2 A alone, starting from the global adapter: each round's traffic is
    that one factor, and the round-2 global keeps round 1's B while its A moves."""
    rundir = run(
        tmp_path, engine, f'engine="{engine}"', 'federation.scheme="reinit"', 'federation.methods=["alternate"]'
    )
    first, second = (r for r in records(rundir) if r["branch"] == "alternate")
    modules = len(first["ranks"])
    b_params = sum(m * 4 for m in (64, 32) * (modules // 2))  # q_proj is 64 x 64, v_proj 32 x 64
    assert first["communication"]["upload_params"] == [b_params] * 3
    assert second["communication"]["upload_params"] == [modules * 4 * 64] * 3
    from florist.adapters import read_adapter

    one, _ = read_adapter(rundir / "rounds" / "001" / "alternate")
    two, _ = read_adapter(rundir / "rounds" / "002" / "alternate")
    for name in one:
        torch.testing.assert_close(fold_scaling(two[name]), fold_scaling(one[name]))
        assert not torch.equal(two[name].A, one[name].A)


def test_core_mean_is_exact_over_the_clients_updates(tmp_path):
    rundir = run(tmp_path, "exact", "federation.rounds=1", 'federation.methods=["coremean"]')
    from florist.adapters import read_adapter

    clients = sorted((rundir / "rounds" / "001" / "clients" / "coremean").iterdir())
    updates = [read_adapter(c)[0] for c in clients]
    sizes = [json.loads((c / "client.json").read_text())["num_examples"] for c in clients]
    global_factors, _ = read_adapter(rundir / "rounds" / "001" / "coremean")
    for name, g in global_factors.items():
        exact = sum(n * fold_scaling(u[name]) @ u[name].A for u, n in zip(updates, sizes)) / sum(sizes)
        torch.testing.assert_close(fold_scaling(g) @ g.A, exact, rtol=1e-4, atol=1e-6)
        assert g.rank == 4


def test_report_and_aggregate_read_the_declaration(tmp_path):
    rundir = run(tmp_path, "report", "federation.rounds=1")
    out = CliRunner().invoke(app, ["report", str(rundir), "--output", str(tmp_path / "rep")])
    assert out.exit_code == 0, out.output
    text = next((tmp_path / "rep").glob("*.md")).read_text()
    assert "Core-Mean" in text and "Local-B" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "Eff" not in line]
    shown = [name for row in rows for name in ("FedIT", "Core-Mean", "Local-B") if row.startswith(f"| {name} ")]
    assert shown[:3] == ["FedIT", "Core-Mean", "Local-B"]  # the table's rows in the declared order
    clients = sorted(str(c) for c in (rundir / "rounds" / "001" / "clients" / "coremean").iterdir())
    agg = CliRunner().invoke(app, ["aggregate", *clients, "--method", "coremean", "--output", str(tmp_path / "agg")])
    assert agg.exit_code == 0, agg.output
    report = json.loads((tmp_path / "agg" / "aggregation.json").read_text())
    assert report["method"] == "coremean"
    assert report["communication"]["upload_params"][0] == report["communication"]["download_params"][0]
    assert "coremean" in METHODS
