"""Every built-in method through ``florist run`` on the tiny model: both engines, heterogeneous ranks, several rounds,
the training groups they share, the schemes their papers fix, resuming, the report and ``florist aggregate``."""

from __future__ import annotations

import json

import pytest
import torch
from test_federation import TINY_RUN, assert_same_adapters, killed_in_round_two
from typer.testing import CliRunner

import florist.engines.flower_app as flower_app
import florist.setup as run_setup
from florist import run as run_module
from florist.adapters import read_adapter
from florist.aggregation.base import fold_scaling
from florist.cli import app
from florist.config import ConfigError, load_config
from florist.methods import METHODS
from florist.models import tiny_llama

NEW = ["fedex", "rolora", "fedsb", "fedsa", "hetlora"]
RANKS = "lora.ranks=[2,4,4]"


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
    tiny = lambda name, dtype, device: tiny_llama(0)  # noqa: E731
    monkeypatch.setattr(run_setup, "load_model", tiny)
    monkeypatch.setattr(flower_app, "load_model", tiny)


def run(tmp_path, name, *overrides, **kw):
    config = load_config(
        None,
        [
            *TINY_RUN,
            RANKS,
            "eval.limit=4",
            "federation.rounds=3",
            f"federation.methods={json.dumps(['fedit', 'ffa', *NEW])}",
            f'output="{tmp_path / name}"',
            *overrides,
        ],
    )
    return run_module.run(config, progress=False, log=lambda m: None, **kw)


def records(rundir):
    return [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines()]


def adapter_of(rundir, round_number, label):
    d = rundir / "rounds" / f"{round_number:03d}" / label
    return read_adapter(d / "global" if (d / "global").is_dir() else d)[0]


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inprocess")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of Ray's simulated SuperNodes has, so the Flower run can match it bit for bit
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(run_setup, "load_model", lambda name, dtype, device: tiny_llama(0))
            return run(tmp, "run")
    finally:
        torch.set_num_threads(threads)


def test_every_method_scores_every_round_and_counts_its_own_traffic(inprocess):
    by = {(r["round"], r["branch"]): r for r in records(inprocess)}
    for name in NEW:
        for round_number in (1, 2, 3):
            record = by[(round_number, name)]
            assert record["evaluation"]["accuracy"] is not None, (name, round_number)
            assert len(record["communication"]["upload_params"]) == 3
    modules = len(by[(1, "fedit")]["ranks"])
    # RoLoRA: B (m x r) in odd rounds, A (r x n) in even; q_proj is 64 x 64, v_proj 32 x 64
    b_params = [modules // 2 * (64 + 32) * r for r in (2, 4, 4)]
    assert by[(1, "rolora")]["communication"]["upload_params"] == b_params
    assert by[(2, "rolora")]["communication"]["upload_params"] == [modules * 64 * r for r in (2, 4, 4)]
    # Fed-SB: R (r x r) each round; in round 1 also LoRA-SB's start, each client's dense gradient up (m x n a
    # module) and B, A and R's start at its rank down
    dense = modules // 2 * (64 * 64 + 32 * 64)
    start_down = [modules // 2 * ((64 + 32) * r + 2 * (64 * r + r * r)) for r in (2, 4, 4)]
    fedsb_one, fedsb_two = by[(1, "fedsb")]["communication"], by[(2, "fedsb")]["communication"]
    assert fedsb_one["start_upload_params"] == [dense] * 3 and fedsb_one["start_download_params"] == start_down
    assert fedsb_one["upload_params"] == [modules * r * r + dense for r in (2, 4, 4)]
    assert fedsb_two["upload_params"] == [modules * r * r for r in (2, 4, 4)] and not fedsb_two["start_upload_params"]
    assert by[(1, "fedsa")]["communication"]["upload_params"] == [modules * 64 * r for r in (2, 4, 4)]
    assert by[(1, "fedex")]["communication"]["residual"] == "dense"
    assert "per_client" in by[(1, "fedsa")]["evaluation"]  # the personalised models, each scored


def test_methods_whose_clients_start_alike_share_round_one(inprocess):
    groups = sorted(p.name for p in (inprocess / "rounds" / "001" / "clients").iterdir())
    # FedEx-LoRA and HetLoRA train as FedIT does, RoLoRA's first round is FFA-LoRA's; Fed-SB and FedSA-LoRA train
    # their own modes
    assert groups == sorted(["ffa", "fedsa", "fedsb", "shared"])
    later = sorted(p.name for p in (inprocess / "rounds" / "002" / "clients").iterdir())
    assert later == sorted(["fedit", "ffa", *NEW])


def test_fedex_base_plus_adapter_is_the_exact_mean_of_the_updates(inprocess):
    clients = sorted((inprocess / "rounds" / "001" / "clients" / "shared").iterdir())
    updates = [read_adapter(c)[0] for c in clients]
    sizes = [json.loads((c / "client.json").read_text())["num_examples"] for c in clients]
    adapter = adapter_of(inprocess, 1, "fedex")
    residual, _ = read_adapter(inprocess / "rounds" / "001" / "fedex" / "residual")
    for name, g in adapter.items():
        exact = sum(n * fold_scaling(u[name]) @ u[name].A for u, n in zip(updates, sizes)) / sum(sizes)
        total = fold_scaling(g) @ g.A + fold_scaling(residual[name]) @ residual[name].A
        torch.testing.assert_close(total, exact, rtol=1e-4, atol=1e-6)


def test_rolora_keeps_the_factor_that_did_not_train(inprocess):
    one, two, three = (adapter_of(inprocess, r, "rolora") for r in (1, 2, 3))
    for name in one:
        torch.testing.assert_close(fold_scaling(two[name]), fold_scaling(one[name]))  # A trained in round 2
        torch.testing.assert_close(three[name].A, two[name].A)  # B trained in round 3
        assert not torch.equal(two[name].A, one[name].A)


def test_the_flower_engine_gives_every_method_the_in_process_result(inprocess, tmp_path, one_thread):
    flower = run(tmp_path, "flower", 'engine="flower"')
    for name in NEW:
        for round_number in (1, 3):
            assert_same_adapters(adapter_of(inprocess, round_number, name), adapter_of(flower, round_number, name))
    a, b = (inprocess / "rounds" / "003" / "fedex" / "residual", flower / "rounds" / "003" / "fedex" / "residual")
    assert_same_adapters(read_adapter(a)[0], read_adapter(b)[0])


def test_a_killed_run_resumes_with_the_residual_and_the_kept_factors(tmp_path, monkeypatch):
    args = ('federation.methods=["fedex","fedsa"]', "federation.rounds=2")
    whole = run(tmp_path, "whole", *args)
    resumed = killed_in_round_two(run, tmp_path, monkeypatch, *args)
    assert_same_adapters(adapter_of(whole, 2, "fedex"), adapter_of(resumed, 2, "fedex"))
    # FedSA-LoRA's clients kept their B in the process that died; the B each reported, saved with its personalised
    # adapter, is where a resumed client's B starts
    for k in range(3):
        d = "rounds/002/fedsa/client_{}"
        assert_same_adapters(read_adapter(whole / d.format(k))[0], read_adapter(resumed / d.format(k))[0])


def test_a_killed_run_resumes_fedsb_from_the_same_start(tmp_path, monkeypatch):
    args = ('federation.methods=["fedsb"]', "federation.rounds=2")
    whole = run(tmp_path, "whole", *args)
    resumed = killed_in_round_two(run, tmp_path, monkeypatch, *args)  # the clients estimate W0's gradient again
    assert_same_adapters(adapter_of(whole, 2, "fedsb"), adapter_of(resumed, 2, "fedsb"))
    by = {r["round"]: r["communication"] for r in records(resumed) if r["branch"] == "fedsb"}
    assert by[1]["start_upload_params"] and not by[2]["start_upload_params"]  # counted once, in round 1


def test_a_combination_a_method_cannot_run_is_refused_before_training(tmp_path, monkeypatch):
    from florist.engines.inprocess import InProcessEngine

    trained = []
    monkeypatch.setattr(InProcessEngine, "train", lambda self, *a: trained.append(a))
    with pytest.raises(ConfigError, match="fedsb rank 100 .*above module"):
        run(tmp_path, "big", 'federation.methods=["fedsb"]', "method.fedsb.rank=100")
    assert not trained
    with pytest.raises(ConfigError, match="method.fedex.*option 'residual'"):
        run(tmp_path, "bad", "method.fedex.residual=sparse")
    with pytest.raises(ConfigError, match="method.nosuch"):
        run(tmp_path, "none", "method.nosuch.x=1")


def test_a_paper_fixed_scheme_holds_under_either_run_scheme(tmp_path):
    alone = ('federation.methods=["rolora"]', "federation.rounds=2")
    merged = run(tmp_path, "merge", *alone, 'federation.scheme="merge"')
    reinit = run(tmp_path, "reinit", *alone, 'federation.scheme="reinit"')
    assert_same_adapters(adapter_of(merged, 2, "rolora"), adapter_of(reinit, 2, "rolora"))


def test_the_report_shows_every_method(inprocess, tmp_path):
    out = CliRunner().invoke(app, ["report", str(inprocess), "--output", str(tmp_path / "rep")])
    assert out.exit_code == 0, out.output
    text = next((tmp_path / "rep").glob("*.md")).read_text()
    for name in NEW:
        assert f"| {METHODS[name].display} " in text, name


def test_florist_aggregate_writes_fedex_residual_beside_its_adapter(inprocess, tmp_path):
    clients = [str(c) for c in sorted((inprocess / "rounds" / "001" / "clients" / "shared").iterdir())]
    out = tmp_path / "agg"
    result = CliRunner().invoke(
        app, ["aggregate", *clients, "--method", "fedex", "--option", "residual=factors", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").is_file() and (out / "residual" / "adapter_config.json").is_file()
    report = json.loads((out / "aggregation.json").read_text())
    assert report["communication"]["residual"] == "factors"
    refused = CliRunner().invoke(app, ["aggregate", *clients, "--method", "rolora", "--output", str(tmp_path / "r")])
    assert refused.exit_code != 0 and "neither A nor B" in refused.output and not (tmp_path / "r").exists()
