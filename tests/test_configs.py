"""The shipped configurations: every one loads and validates, and the paper's grid is complete and as generated."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from florist.config import load_config
from florist.methods import BUILTIN, get_method
from florist.models import MODEL_ALIASES
from florist.server import make_branches

ROOT = Path(__file__).resolve().parents[1]
LATER = sorted((ROOT / "configs" / "paper").glob("*-100-clients.toml"))
PAPER = sorted(set((ROOT / "configs" / "paper").glob("*.toml")) - set(LATER))
CPU = sorted((ROOT / "configs" / "cpu").glob("*.toml"))
CPU_LATER = [p for p in CPU if p.stem.endswith("-100-clients")]  # the later setting scaled down: three methods


def florist_taus(config) -> list[float]:
    """FLoRIST's τ as a run reads them from ``config`` (its sweep's config key)."""
    return get_method("florist").values(config)


def _generator():
    spec = importlib.util.spec_from_file_location("make_paper_configs", ROOT / "configs" / "make_paper_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", PAPER + CPU, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.output.startswith("runs/")
    if path in CPU_LATER:
        assert config.federation.methods == ["florist", "flora", "fedit"]
    else:
        # every built-in method, the 2025 ones too; private FLoRIST gives FLoRIST's adapters (only its traffic differs,
        # which florist demo and docs/methods.md show), so the grids leave it out
        assert set(config.federation.methods) == {m.name for m in BUILTIN} - {"privflorist"}


@pytest.mark.parametrize("path", LATER, ids=lambda p: p.name)
def test_the_later_setting_is_100_clients_10_a_round_75_rounds_over_the_papers_hyperparameters(path):
    c = load_config(path)
    assert (c.data.clients, c.federation.clients_per_round, c.federation.rounds, c.train.epochs) == (100, 10, 75, 1.0)
    assert (c.train.lr, c.train.batch_size, c.data.cutoff, c.client_ranks()) == (3e-4, 128, 512, [16] * 100)
    assert set(c.federation.methods) == {"florist", "flora", "fedit", "flexlora", "ffa"} and c.eval.every == 5
    assert c.output.startswith("runs/")
    assert len(make_branches(c.federation.methods, florist_taus(c), rounds=75)) == 9


def test_paper_grid_is_every_model_dataset_and_rank_setting():
    configs = [load_config(p) for p in PAPER]
    cells = {(c.model.name, c.data.train, tuple(c.client_ranks())) for c in configs}
    models = {"tinyllama", "llama-3.2-1b", "llama-7b"}
    data = {"databricks/databricks-dolly-15k", "tatsu-lab/alpaca", "WizardLM/WizardLM_evol_instruct_70k"}
    ranks = {(16,) * 8, (64, 32, 16, 16, 8, 8, 4, 4)}
    assert len(PAPER) == 18
    assert cells == {(m, d, r) for m in models for d in data for r in ranks}
    assert models <= set(MODEL_ALIASES)
    assert len({c.output for c in configs}) == 18


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_configs_carry_the_authors_hyperparameters(path):
    c = load_config(path)
    assert (c.data.clients, c.data.partition, c.data.alpha, c.data.cutoff, c.data.train_on_inputs) == (
        8,
        "dirichlet",
        0.5,
        512,
        True,
    )
    assert (c.federation.rounds, c.train.epochs, c.train.lr, c.train.batch_size, c.train.micro_batch_size) == (
        1,
        3.0,
        3e-4,
        128,
        16,
    )
    assert (c.lora.alpha_per_rank, c.lora.dropout, c.lora.target_modules) == (2.0, 0.05, ["q_proj", "v_proj"])
    assert c.model.dtype == "float32"
    assert florist_taus(c) == pytest.approx([0.80 + 0.01 * i for i in range(21)])
    assert (c.eval.questions, c.eval.mode, c.eval.limit) == ("../shared/data/mmlu/mmlu_1444.json", "letter", 0)


def test_paper_configs_are_what_the_generator_writes():
    generator = _generator()
    expected = {name: header + "\n" + generator.to_toml(config) for name, (header, config) in generator.grid().items()}
    assert {p.stem: p.read_text() for p in PAPER + LATER} == expected


@pytest.mark.parametrize("path", CPU, ids=lambda p: p.name)
def test_cpu_configs_read_the_shared_data(path, shared_data):
    c = load_config(path)
    assert c.model.name is None  # the embedded SmolLM2-135M
    files = (c.data.train, c.eval.heldout) + (() if c.eval.questions == "none" else (c.eval.questions,))
    for relative in files:
        assert (ROOT / relative).resolve().is_relative_to(shared_data.resolve())
        assert (ROOT / relative).exists()
    if c.federation.rounds == 1:  # the grid: a tau sweep, scored on MMLU too
        assert len(florist_taus(c)) > 1 and c.eval.mode == "letter" and c.eval.limit > 0
    else:  # the later setting: the shared clients pooled and split over 100, a tenth drawn a round
        assert c.data.resplit and c.data.clients == 100 and c.federation.clients_per_round == 10


@pytest.mark.parametrize("path", PAPER + CPU, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_name_their_branches_as_saved_runs_do(path):
    c = load_config(path)
    taus = florist_taus(c)
    labels = [b.label for b in make_branches(c.federation.methods, taus)]
    expected = [f"florist@{t:.2f}" for t in taus] + sorted(set(c.federation.methods) - {"florist"})
    assert sorted(labels) == sorted(expected) and len(set(labels)) == len(labels)
