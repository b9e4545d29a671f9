"""``florist aggregate`` end to end: real PEFT client adapters in, a PEFT adapter out whose forward is
base + the aggregated update, and a one-line error with nothing written for every bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapters import TARGETS, load_peft, logits, lora_layers, merged, save_client_adapter, tiny_llama
from typer.testing import CliRunner

import florist.adapters as adapters
from florist.adapters import CONFIG_NAME, WEIGHTS_NAME
from florist.cli import app

runner = CliRunner()

# Three clients with different ranks and scalings: plain, rsLoRA, and a rank_pattern override.
CLIENT_CONFIGS = [
    {"r": 4, "lora_alpha": 8},
    {"r": 2, "lora_alpha": 8, "use_rslora": True},
    {"r": 3, "lora_alpha": 3, "rank_pattern": {"model.layers.1.self_attn.v_proj": 5}},
]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def clients(base, tmp_path_factory):
    """(paths, PEFT's own (A, B, scaling) per module for each client)."""
    root = tmp_path_factory.mktemp("clients")
    paths, factors = [], []
    for k, config in enumerate(CLIENT_CONFIGS):
        paths.append(root / f"site{k}")
        factors.append(save_client_adapter(base, paths[-1], seed=10 + k, **config))
    return paths, factors


@pytest.fixture(scope="module")
def ffa_clients(base, tmp_path_factory):
    """Clients whose frozen A is the same seeded draw; only B and the scaling differ."""
    root = tmp_path_factory.mktemp("ffa")
    paths, factors = [], []
    for k, alpha in enumerate([8, 16]):
        paths.append(root / f"site{k}")
        factors.append(save_client_adapter(base, paths[-1], seed=20 + k, shared_a_seed=99, r=4, lora_alpha=alpha))
    return paths, factors


def run(*args):
    return runner.invoke(app, ["aggregate", *map(str, args)])


def exact_update(factors, weights) -> dict[str, torch.Tensor]:
    """ΔW = Σ_k w_k s_k B_k A_k per module, in float64, from PEFT's own factors and scalings."""
    total = sum(weights)
    return {
        name: sum(
            (w / total) * s * (B.double() @ A.double())
            for w, client in zip(weights, factors)
            for A, B, s in [client[name]]
        )
        for name in factors[0]
    }


def best_rank(delta: torch.Tensor, p: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :p] * S[:p]) @ Vh[:p]


def loaded_deltas(base, directory) -> dict[str, torch.Tensor]:
    return {
        name: layer.get_delta_weight("default").double()
        for name, layer in lora_layers(load_peft(base, directory)).items()
    }


def report(out):
    return json.loads((out / "aggregation.json").read_text())


def assert_close(actual: dict, expected: dict, rel=1e-5):
    """Per module, equal up to float32 round-off relative to the update's size."""
    assert sorted(actual) == sorted(expected)
    for name in expected:
        error = (actual[name] - expected[name]).norm() / expected[name].norm()
        assert error < rel, f"{name}: relative error {error:.2e}"


# ---------------------------------------------------------------- what gets written


@pytest.mark.parametrize(
    "method_args", [["--method", "florist", "--threshold", "1"], ["--method", "flora"]], ids=["florist_tau1", "flora"]
)
def test_exact_methods_write_the_federated_update(base, clients, tmp_path, method_args):
    paths, factors = clients
    out = tmp_path / "global"
    result = run(*method_args, "--output", out, *paths)
    assert result.exit_code == 0, result.output
    expected = exact_update(factors, [1, 1, 1])
    assert_close(loaded_deltas(base, out), expected)
    model = load_peft(base, out)
    torch.testing.assert_close(logits(model), logits(merged(base, expected)), rtol=1e-4, atol=1e-5)

    info = report(out)
    assert info["clients"] == [str(p) for p in paths]
    assert info["weights"] == pytest.approx([1 / 3] * 3) and info["weights_given"] is None
    [adapter] = info["adapters"]
    assert adapter["path"] == "." and adapter["client"] is None
    sum_of_ranks = {name: sum(client[name][0].shape[0] for client in factors) for name in expected}
    assert adapter["ranks"] == sum_of_ranks  # the random updates have full stacked rank
    comm = info["communication"]
    uploaded = sum(A.numel() + B.numel() for client in factors for A, B, _ in client.values())
    assert comm["total_upload_params"] == uploaded
    assert comm["eff"] == pytest.approx(1 / sum(sum_of_ranks.values()))
    if info["method"] == "florist":
        assert info["threshold"] == 1.0
        assert {name: len(s) for name, s in info["singular_values"].items()} == sum_of_ranks
    else:
        assert info["threshold"] is None and info["singular_values"] == {}
    assert "Eff x10^4" in result.stdout and f"wrote {out}" in result.stdout


def test_weights_weigh_the_clients(base, clients, tmp_path):
    paths, factors = clients
    out = tmp_path / "g"
    result = run("--method", "florist", "--threshold", "1", "--weights", "300,100,0", "--output", out, *paths)
    assert result.exit_code == 0, result.output
    assert_close(loaded_deltas(base, out), exact_update(factors, [3, 1, 0]))
    assert report(out)["weights"] == pytest.approx([0.75, 0.25, 0.0])
    assert report(out)["weights_given"] == [300, 100, 0]


def test_florist_threshold_keeps_the_best_low_rank_part(base, clients, tmp_path):
    paths, factors = clients
    out = tmp_path / "g"
    assert run("--method", "florist", "--threshold", "0.6", "--output", out, *paths).exit_code == 0
    info = report(out)
    ranks = info["adapters"][0]["ranks"]
    exact = exact_update(factors, [1, 1, 1])
    expected = {}
    for name, delta in exact.items():
        S = torch.linalg.svdvals(delta)
        energy = (S.square().cumsum(0) / S.square().sum()).tolist()
        assert ranks[name] == next(p + 1 for p, e in enumerate(energy) if e >= 0.6 - 1e-12)
        kept_spectrum = info["singular_values"][name]  # the stacked spectrum: sum of ranks values, all non-zero here
        assert kept_spectrum == pytest.approx(S[: len(kept_spectrum)].tolist(), rel=1e-4)
        expected[name] = best_rank(delta, ranks[name])
    assert_close(loaded_deltas(base, out), expected)
    assert max(ranks.values()) < 9


def test_fedit_averages_the_factors(base, clients, tmp_path):
    paths, factors = clients
    out = tmp_path / "g"
    assert run("--method", "fedit", "--output", out, *paths).exit_code == 0
    expected = {}
    for name in factors[0]:
        r = max(client[name][0].shape[0] for client in factors)
        B = (
            sum(s * torch.nn.functional.pad(B.double(), (0, r - B.shape[1])) for A, B, s in (c[name] for c in factors))
            / 3
        )
        A = (
            sum(
                torch.nn.functional.pad(A.double(), (0, 0, 0, r - A.shape[0])) for A, B, s in (c[name] for c in factors)
            )
            / 3
        )
        expected[name] = B @ A
    assert_close(loaded_deltas(base, out), expected)


def test_ffa_averages_b_over_the_shared_a(base, ffa_clients, tmp_path):
    paths, factors = ffa_clients
    out = tmp_path / "g"
    assert run("--method", "ffa", "--output", out, *paths).exit_code == 0
    assert_close(loaded_deltas(base, out), exact_update(factors, [1, 1]))
    comm = report(out)["communication"]
    assert comm["total_upload_params"] == sum(B.numel() for client in factors for _, B, _ in client.values())


def test_flexlora_writes_one_truncation_per_client(base, clients, tmp_path):
    paths, factors = clients
    out = tmp_path / "g"
    result = run("--method", "flexlora", "--output", out, *paths)
    assert result.exit_code == 0, result.output
    info = report(out)
    assert [a["path"] for a in info["adapters"]] == ["client_0", "client_1", "client_2"]
    assert [a["client"] for a in info["adapters"]] == [str(p) for p in paths]
    assert not (out / WEIGHTS_NAME).exists()
    exact = exact_update(factors, [1, 1, 1])
    for k, client in enumerate(factors):
        ranks = {name: A.shape[0] for name, (A, _, _) in client.items()}
        assert info["adapters"][k]["ranks"] == ranks
        expected = {name: best_rank(delta, ranks[name]) for name, delta in exact.items()}
        assert_close(loaded_deltas(base, out / f"client_{k}"), expected)
    # FlexLoRA's SVD is of the dense m x n update: min(m, n) singular values per module.
    assert {name: len(s) for name, s in info["singular_values"].items()} == {
        name: min(d.shape) for name, d in exact.items()
    }


def test_overwrite_replaces_the_output(clients, tmp_path):
    paths, _ = clients
    out = tmp_path / "g"
    assert run("--method", "flexlora", "--output", out, *paths).exit_code == 0
    result = run("--method", "fedit", "--overwrite", "--output", out, *paths)
    assert result.exit_code == 0, result.output
    assert report(out)["method"] == "fedit" and not (out / "client_0").exists()


# ---------------------------------------------------------------- bad input


def copy_client(source, directory, edit=None):
    shutil.copytree(source, directory)
    if edit is not None:
        tensors = load_file(directory / WEIGHTS_NAME)
        edit(tensors)
        save_file(tensors, directory / WEIGHTS_NAME)
    return directory


def poison(tensors):
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = math.nan


def assert_refused(result, out, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("florist: "), result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0]
    assert not out.exists()


def test_refuses_a_missing_directory(clients, tmp_path):
    paths, _ = clients
    missing = tmp_path / "site9"
    result = run("--method", "florist", "--output", tmp_path / "out", paths[0], missing)
    assert_refused(result, tmp_path / "out", f"{missing}: no such directory")


def test_refuses_a_pickle_adapter(clients, tmp_path):
    paths, _ = clients
    pickled = copy_client(paths[1], tmp_path / "pickled")
    (pickled / WEIGHTS_NAME).rename(pickled / "adapter_model.bin")
    result = run("--method", "fedit", "--output", tmp_path / "out", paths[0], pickled)
    assert_refused(
        result, tmp_path / "out", f"{pickled}: adapter_model.bin is a pickle file; florist reads only safetensors"
    )


def test_refuses_clients_whose_modules_differ(base, clients, tmp_path):
    paths, _ = clients
    q_only = tmp_path / "q_only"
    save_client_adapter(base, q_only, seed=1, target_modules=["q_proj"])
    result = run("--method", "florist", "--output", tmp_path / "out", paths[0], q_only)
    assert_refused(result, tmp_path / "out", q_only, "module model.layers.0.self_attn.v_proj")


def test_refuses_clients_whose_shapes_differ(clients, tmp_path):
    paths, _ = clients
    wider = tmp_path / "wider"
    save_client_adapter(tiny_llama(hidden=48), wider, seed=1)
    result = run("--method", "flora", "--output", tmp_path / "out", paths[0], wider)
    assert_refused(result, tmp_path / "out", wider, "module model.layers.0.self_attn.q_proj", "48x48")


def test_refuses_nan(clients, tmp_path):
    paths, _ = clients
    bad = copy_client(paths[2], tmp_path / "nan", poison)
    result = run("--method", "flexlora", "--output", tmp_path / "out", paths[0], bad)
    assert_refused(result, tmp_path / "out", bad, "module model.layers.1.self_attn.v_proj", "NaN or Inf")


def test_refuses_ffa_clients_whose_a_differ(clients, tmp_path):
    paths, _ = clients
    result = run("--method", "ffa", "--output", tmp_path / "out", *paths)
    assert_refused(result, tmp_path / "out", f"{paths[1]}, module model.layers.0.self_attn.q_proj", "frozen A")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "florist", "--threshold", "0"], "--threshold 0: florist's τ must hold taus in (0, 1]"),
        (["--method", "florist", "--threshold", "1.5"], "--threshold 1.5: florist's τ must hold taus in (0, 1]"),
        (["--method", "florist", "--threshold", "-0.2"], "--threshold -0.2: florist's τ must hold taus in (0, 1]"),
        (
            ["--method", "flora", "--threshold", "0.9"],
            "--threshold applies to methods with a swept parameter (florist, privflorist), not flora",
        ),
        (["--method", "fedavg"], "unknown method 'fedavg'; choose from fedit, flora"),
        (["--method", "fedit", "--weights", "1,2"], "--weights gives 2 weights for 3 clients"),
        (["--method", "fedit", "--weights", "1,-1,2"], "weight -1.0 is not a non-negative finite number"),
        (["--method", "fedit", "--weights", "1,nan,2"], "weight nan is not a non-negative finite number"),
        (["--method", "fedit", "--weights", "0,0,0"], "--weights: the clients' weights sum to zero"),
        (["--method", "fedit", "--weights", "1,x,2"], "--weights: 'x' is not a number"),
    ],
)
def test_refuses_bad_options(clients, tmp_path, args, message):
    paths, _ = clients
    assert_refused(run(*args, "--output", tmp_path / "out", *paths), tmp_path / "out", message)


def test_refuses_an_existing_output(clients, tmp_path):
    paths, _ = clients
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.txt").write_text("keep me")
    result = run("--method", "florist", "--output", out, *paths)
    assert result.exit_code == 2 and "exists and is not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["results.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / CONFIG_NAME).exists()


def test_targets_are_recorded_as_leaf_names(clients, tmp_path):
    paths, _ = clients
    out = tmp_path / "g"
    assert run("--method", "fedit", "--output", out, *paths).exit_code == 0
    config = json.loads((out / CONFIG_NAME).read_text())
    assert sorted(config["target_modules"]) == TARGETS and config["use_rslora"] is False


def test_refuses_an_output_that_would_replace_a_client(clients):
    paths, _ = clients
    before = sorted(p.name for p in paths[0].iterdir())
    result = run("--method", "fedit", "--overwrite", "--output", paths[0].parent, *paths)
    assert result.exit_code == 2 and f"would replace the client directory {paths[0]}" in result.stderr
    assert sorted(p.name for p in paths[0].iterdir()) == before


def test_the_command_line_starts_without_importing_peft_or_transformers():
    """`florist --help` and a command's startup must not wait seconds for libraries only the work itself needs."""
    code = "import sys, florist.cli; print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("spelling", ["as given", "through a symlink", "through .."])
def test_refuses_a_client_given_twice(clients, tmp_path, spelling):
    paths, _ = clients
    again = {
        "as given": paths[1],
        "through a symlink": tmp_path / "link",
        "through ..": paths[1].parent / ".." / paths[1].parent.name / paths[1].name,
    }[spelling]
    if spelling == "through a symlink":
        again.symlink_to(paths[1], target_is_directory=True)
    result = run("--method", "fedit", "--output", tmp_path / "out", *paths, again)
    same = "" if spelling == "as given" else f" (the same directory as {paths[1]})"
    assert_refused(result, tmp_path / "out", f"client directory {again} is given twice{same}; name each client once")


def tree(root):
    """Every entry under ``root``: a file's bytes, "dir", or a symlink's target (never followed)."""
    return {
        str(p.relative_to(root)): f"-> {p.readlink()}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def add_notes(out, outside):
    (out / "notes.txt").write_text("mine")
    return "holds 1 file florist did not write (notes.txt); refusing to delete it"


def add_link(out, outside):
    (out / "site").symlink_to(outside, target_is_directory=True)
    return "holds 1 file florist did not write (site); refusing to delete it"


def add_folder(out, outside):
    (out / "client_9").mkdir()  # a folder of an adapter's name that holds no adapter
    (out / "client_9" / "train.json").write_text("[]")
    return "holds 1 file florist did not write (client_9/train.json); refusing to delete it"


def enter(out, outside):
    os.chdir(out)
    return f"{out}: holds the working directory"


@pytest.mark.parametrize("change", [add_notes, add_link, add_folder, enter])
def test_overwrite_replaces_only_an_aggregate_florist_wrote(clients, tmp_path, monkeypatch, change):
    paths, _ = clients
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    assert run("--method", "flexlora", "--output", out, *paths).exit_code == 0
    monkeypatch.chdir(tmp_path)
    message = change(out, outside)
    before = tree(tmp_path)
    result = run("--method", "fedit", "--overwrite", "--output", out, *paths)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert message in result.stderr
    assert tree(tmp_path) == before


def test_refuses_an_empty_output(clients, tmp_path, monkeypatch):
    paths, _ = clients
    monkeypatch.chdir(tmp_path)
    for overwrite in ([], ["--overwrite"]):
        result = run("--method", "fedit", *overwrite, "--output", "", *paths)
        assert (
            result.exit_code == 2 and result.stderr.strip() == "florist: --output is empty; name the directory to write"
        )
    assert list(tmp_path.iterdir()) == []


def test_an_output_under_a_file_is_refused_before_reading_any_client(clients, tmp_path):
    paths, _ = clients
    result = run("--method", "fedit", "--output", "/dev/null/out", *paths, tmp_path / "site9")  # site9: no such client
    assert_refused(result, Path("/dev/null/out"), "cannot write /dev/null/out: /dev/null is not a directory")


def disk_full(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_is_one_line_keeps_the_old_output_and_the_command_can_be_rerun(clients, tmp_path, monkeypatch):
    paths, _ = clients
    out, old = tmp_path / "new", tmp_path / "old"
    assert run("--method", "fedit", "--output", old, *paths).exit_code == 0
    before = tree(tmp_path)
    monkeypatch.setattr(adapters, "save_file", disk_full)
    for target, overwrite in ((out, []), (old, ["--overwrite"])):
        result = run("--method", "flora", *overwrite, "--output", target, *paths)
        assert_refused(result, out, f"cannot write {target}: No space left on device")
        assert tree(tmp_path) == before  # no half-written adapter, no temporary sibling, the old output whole
    monkeypatch.undo()
    assert run("--method", "flora", "--output", out, *paths).exit_code == 0
    assert report(out)["method"] == "flora"
