"""The federated loop on the tiny config-built Llama: sharing, resume, schemes, sampling, run directory."""

from __future__ import annotations

import json

import pytest
import torch

import florist.run as run_module
import florist.setup as run_setup
from florist.adapters import read_adapter
from florist.config import load_config
from florist.models import tiny_llama
from florist.server import Federation

# a federation of seconds on the tiny model, shared by the engine and reliability tests
TINY_RUN = [
    "data.clients=3",
    "data.max_examples_per_client=6",
    "data.cutoff=32",
    'data.partition="iid"',
    "train.batch_size=4",
    "train.micro_batch_size=2",
    "train.lr=0.01",
    "eval.batch_size=8",
]
FAST = [*TINY_RUN, "eval.limit=8", "lora.ranks=[4]", 'federation.thresholds="0.90"']


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
    monkeypatch.setattr(run_setup, "load_model", lambda name, dtype, device: tiny_llama(0))


def run(tmp_path, name, *overrides, **kw):
    cfg = load_config(None, FAST + [f'output="{tmp_path / name}"', *overrides])
    return run_module.run(cfg, progress=False, log=lambda m: None, **kw)


def global_factors(path, round_number, label):
    factors, _ = read_adapter(path / "rounds" / f"{round_number:03d}" / label)
    return factors


def assert_same_adapters(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n].A, b[n].A) and torch.equal(a[n].B, b[n].B), n


def test_a_method_alone_equals_the_same_method_inside_the_sweep(tmp_path):
    swept = run(tmp_path, "sweep", 'federation.methods=["fedit","florist","flora"]', 'federation.thresholds="0.5,0.9"')
    alone = run(tmp_path, "alone", 'federation.methods=["florist"]', 'federation.thresholds="0.9"')
    assert_same_adapters(global_factors(swept, 1, "florist@0.90"), global_factors(alone, 1, "florist@0.90"))
    # every branch was aggregated from the same client adapters, saved once
    assert [p.name for p in (swept / "rounds" / "001" / "clients").iterdir()] == ["shared"]


def killed_in_round_two(run, tmp_path, monkeypatch, *args):
    """A run killed as its round 2 starts, then resumed: the resumed run directory."""
    real = Federation.run_round

    def die_in_round_two(self, round_number):
        if round_number == 2:
            raise KeyboardInterrupt
        return real(self, round_number)

    monkeypatch.setattr(Federation, "run_round", die_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "killed", *args)
    assert json.loads((tmp_path / "killed" / "state.json").read_text())["completed_rounds"] == 1
    monkeypatch.setattr(Federation, "run_round", real)
    return run(tmp_path, "killed", *args)


def test_a_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    args = ('federation.methods=["florist","fedit"]', "federation.rounds=2")
    whole = run(tmp_path, "whole", *args)
    resumed = killed_in_round_two(run, tmp_path, monkeypatch, *args)
    for label in ("florist@0.90", "fedit"):
        assert_same_adapters(global_factors(whole, 2, label), global_factors(resumed, 2, label))
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2  # base, then two branches for two rounds


def test_a_different_config_in_the_same_directory_is_refused(tmp_path):
    from florist.rundir import RunDirError

    run(tmp_path, "r", 'federation.methods=["fedit"]')
    with pytest.raises(RunDirError, match="different configuration"):
        run(tmp_path, "r", 'federation.methods=["flora"]')


def test_run_directory_holds_config_clients_globals_metrics_and_results(tmp_path):
    path = run(tmp_path, "r", 'federation.methods=["flexlora","ffa"]', "lora.ranks=[4,2,2]")
    assert (path / "config.toml").exists() and (path / "results.md").exists() and (path / "results.csv").exists()
    r1 = path / "rounds" / "001"
    assert sorted(p.name for p in (r1 / "clients").iterdir()) == ["ffa", "shared"]
    # heterogeneous FlexLoRA: one adapter per client at its own rank
    for k, rank in enumerate([4, 2, 2]):
        factors, _ = read_adapter(r1 / "flexlora" / f"client_{k}")
        assert {f.rank for f in factors.values()} == {rank}
    # FFA-LoRA: every client's A is the shared frozen one, and the global keeps it
    a = [read_adapter(r1 / "clients" / "ffa" / f"client_{k}")[0] for k in range(3)]
    g = global_factors(path, 1, "ffa")
    for n in g:
        for k, rank in enumerate([4, 2, 2]):
            assert torch.equal(a[k][n].A, g[n].A[:rank])
    records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    flex = next(r for r in records if r["branch"] == "flexlora")
    assert len(flex["evaluation"]["per_client"]) == 3  # the data-weighted mean of the client models
    results = (path / "results.md").read_text()
    assert "| flexlora |" in results and "| ffa |" in results


def test_client_sampling_is_seeded_and_recorded(tmp_path):
    path = run(tmp_path, "r", 'federation.methods=["fedit"]', "federation.clients_per_round=2", "federation.rounds=2")
    records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()][1:]
    assert all(len(r["participants"]) == 2 for r in records)
    again = run(tmp_path, "r2", 'federation.methods=["fedit"]', "federation.clients_per_round=2", "federation.rounds=2")
    assert [json.loads(x)["participants"] for x in (again / "metrics.jsonl").read_text().splitlines()][1:] == [
        r["participants"] for r in records
    ]


def test_reinit_scheme_starts_clients_from_the_global_adapter(tmp_path, monkeypatch):
    starts = []
    from florist.client import LocalTrainer

    real = LocalTrainer.train

    def spy(self, examples, start, client_id="", on_step=None, kept=None):
        starts.append(start)
        return real(self, examples, start, client_id, on_step, kept)

    monkeypatch.setattr(LocalTrainer, "train", spy)
    run(tmp_path, "r", 'federation.methods=["florist"]', 'federation.scheme="reinit"', "federation.rounds=2")
    assert all(s.init is None for s in starts[:3])
    assert all(s.init is not None for s in starts[3:])


def test_merge_scheme_merges_every_past_global_update(tmp_path, monkeypatch):
    from florist.engines.inprocess import InProcessEngine

    merged = []
    real = InProcessEngine.train

    def spy(self, round_number, jobs):
        merged.append([len(j.base_deltas) for j in jobs])
        return real(self, round_number, jobs)

    monkeypatch.setattr(InProcessEngine, "train", spy)
    run(tmp_path, "r", 'federation.methods=["fedit"]', "federation.rounds=3", 'eval.questions="none"')
    assert merged == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]  # round r trains on the base plus rounds 1..r-1


@pytest.mark.slow
def test_embedded_model_on_the_real_dolly_clients(tmp_path, shared_data, monkeypatch):
    """The whole pipeline on the real model and data: 8 Dolly clients, every method, MMLU and held-out loss."""
    from florist.models import load_model

    monkeypatch.setattr(run_setup, "load_model", load_model)
    cfg = load_config(
        None,
        [
            f'output="{tmp_path / "dolly"}"',
            f'data.train="{shared_data / "dolly"}"',
            "data.max_examples_per_client=4",
            "data.cutoff=64",
            "train.max_steps=1",
            "train.batch_size=4",
            "train.micro_batch_size=4",
            'federation.thresholds="0.9,1.0"',
            f'eval.questions="{shared_data / "mmlu" / "mmlu_1444.json"}"',
            'eval.mode="letter"',
            "eval.limit=8",
            f'eval.heldout="{shared_data / "dolly" / "test.json"}"',
        ],
    )
    path = run_module.run(cfg, progress=False, log=lambda m: None)
    records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert {r["branch"] for r in records} == {
        "base",
        "florist@0.90",
        "florist@1.00",
        "flora",
        "fedit",
        "flexlora",
        "ffa",
    }
    for r in records:
        assert 0.0 <= r["evaluation"]["accuracy"] <= 1.0 and r["evaluation"]["heldout_loss"] > 0
    exact = {r["branch"]: r for r in records}
    # tau = 1 keeps the exact update, whose rank is at most FLoRA's stack
    assert all(p <= 8 * 16 for p in exact["florist@1.00"]["ranks"].values())
    assert exact["florist@1.00"]["evaluation"]["heldout_loss"] == pytest.approx(
        exact["flora"]["evaluation"]["heldout_loss"], rel=1e-3
    )


def test_seeds_of_different_purposes_rounds_and_clients_never_collide():
    """One function derives every seed; a linear formula repeated itself at 1,009 clients, this one does not."""
    from florist.jobs import SEED_PURPOSES, seed_for

    seeds = [seed_for(7, p, r, c) for p in SEED_PURPOSES for r in range(4) for c in range(3000)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    assert seed_for(7, "client", 2, 5) == seed_for(7, "client", 2, 5) != seed_for(8, "client", 2, 5)
    with pytest.raises(ValueError, match="no seed is drawn for 'typo'"):
        seed_for(7, "typo")
