"""Private FLoRIST (``privflorist``): FLoRIST's result from two sums over the clients, its protocol's traffic, and its
refusal on an engine that would send the pairs in the clear."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_aggregation import make_updates
from test_federation import TINY_RUN

import florist.setup as run_setup
from florist import run as run_module
from florist.adapters import read_adapter
from florist.aggregation.base import fold_scaling
from florist.communication import round_communication
from florist.config import ConfigError, load_config
from florist.methods import aggregate, get_method
from florist.models import tiny_llama


def saved_adapter(rundir, round_number, label):
    d = rundir / "rounds" / f"{round_number:03d}" / label
    return read_adapter(d / "global" if (d / "global").is_dir() else d)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [0.5, 0.8, 0.95, 1.0])
def test_it_gives_florists_adapter(dtype, tau):
    updates = make_updates(2, [4, 2, 6, 3], 40, 30, scalings=[2.0, 1.0, 0.5, 3.0], dtype=dtype)
    private, plain = aggregate("privflorist", updates, value=tau), aggregate("florist", updates, value=tau)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for name in ("q", "v"):
        got, want = private.modules[name], plain.modules[name]
        assert got.rank == want.rank and got.B.dtype == dtype
        scale = float(want.singular_values[0])
        torch.testing.assert_close(got.delta(), want.delta(), rtol=tol, atol=tol * scale)
        torch.testing.assert_close(got.singular_values, want.singular_values, rtol=tol, atol=tol * scale)


def test_its_traffic_is_the_two_exchanges_and_the_basis_between_them():
    ranks, (m, n) = [4, 2, 6], (40, 30)
    updates = make_updates(3, ranks, m, n)
    method = get_method("privflorist").configured({"oversampling": 3})
    result = aggregate(method, updates, value=0.9)
    comm = round_communication(method, 1, updates, result)
    width = sum(ranks) + 3
    per_module_up, per_module_q = (m + n) * width, m * width
    assert comm.upload_params == [2 * per_module_up] * 3  # modules q and v
    pair_down = sum(mod.rank * (m + n) for mod in result.modules.values())
    assert comm.download_params == [2 * per_module_q + pair_down] * 3
    plain = round_communication(get_method("florist"), 1, updates, aggregate("florist", updates, value=0.9))
    assert plain.upload_params == [2 * r * (m + n) for r in ranks]  # FLoRIST: each client its own pair
    assert plain.download_params == [pair_down] * 3


def test_a_negative_oversampling_is_refused():
    with pytest.raises(ValueError, match="oversampling"):
        get_method("privflorist").configured({"oversampling": -1})


def test_the_flower_engine_refuses_it_before_the_run_directory_is_made(tmp_path):
    refused = r"^federation.methods: privflorist runs on the in-process engine only: .* set engine = \"inprocess\""
    methods = 'federation.methods=["florist","privflorist"]'
    with pytest.raises(ConfigError, match=refused):  # the config itself, when it names the engine
        load_config(None, ['engine="flower"', methods, f'output="{tmp_path / "run"}"'])
    # a deployment's ServerApp sets the engine after reading the config: the run refuses it there too
    config = dataclasses.replace(load_config(None, [methods, f'output="{tmp_path / "run"}"']), engine="flower")
    with pytest.raises(ConfigError, match=refused):
        run_module.run(config, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_in_a_run_it_scores_as_florist_and_counts_its_own_traffic(tmp_path, monkeypatch):
    monkeypatch.setattr(run_setup, "load_model", lambda name, dtype, device: tiny_llama(0))
    config = load_config(
        None,
        [
            *TINY_RUN,
            "eval.limit=4",
            "lora.ranks=[2,4,4]",
            "federation.rounds=2",
            'federation.thresholds="0.9"',
            'federation.methods=["florist","privflorist"]',
            f'output="{tmp_path / "run"}"',
        ],
    )
    rundir = run_module.run(config, progress=False, log=lambda m: None)
    records = [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines()]
    by = {(r["round"], r["method"]): r for r in records if r["round"] > 0}
    for n in (1, 2):
        private, plain = by[(n, "privflorist")], by[(n, "florist")]
        assert private["ranks"] == plain["ranks"]
        assert private["evaluation"]["accuracy"] == plain["evaluation"]["accuracy"]
        ours, theirs = (saved_adapter(rundir, n, label) for label in ("privflorist@0.90", "florist@0.90"))
        for name, pair in theirs.items():  # the same global update, to float32's rounding
            want = fold_scaling(pair) @ pair.A
            got = fold_scaling(ours[name]) @ ours[name].A
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
        up, plain_up = private["communication"]["upload_params"], plain["communication"]["upload_params"]
        assert all(u > p for u, p in zip(up, plain_up))  # (m + n)·Σr a module for every client, against (m + n)·r_k
        assert len(set(up)) == 1 and len(set(plain_up)) == 2  # every client sends as much, whatever its rank
    assert "| privflorist@0.90 |" in (rundir / "results.md").read_text()
