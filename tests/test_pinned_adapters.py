"""Every method's global adapters on the tiny model, pinned: a change to the loop, the client, the engines or the
aggregation that alters what a run produces under the same seed fails here.

The references in ``tests/data/pinned/`` were written by this test with ``FLORIST_PIN=1`` (run it so only when a
change is meant to alter results, and say so in the commit). Training runs in float32 so that the comparison holds
across CPUs whose bfloat16 kernels round differently. The tolerance covers float32 summation order only, measured
against each tensor's largest entry. Two rounds of Adam amplify the last bits of a gradient. Between an AVX-512 Xeon
and an AVX2 EPYC, FFA-LoRA's round-2 B moved by 1.2e-3 of its scale, and every other tensor by under 1e-4. A change
in what a run computes moves tensors by a sizeable fraction of their scale.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_federation import TINY_RUN

from florist import run as run_module
from florist import setup as run_setup
from florist.config import load_config
from florist.models import tiny_llama

PINNED = Path(__file__).parent / "data" / "pinned"
SUMMATION_ORDER = 5e-3  # of a tensor's largest entry: what float32 kernels of another CPU move it by, with margin

CASES = {
    # every method, equal ranks, past rounds merged into the base
    "merge": ["lora.ranks=[4]", 'federation.scheme="merge"'],
    # heterogeneous ranks, clients restart from the global adapter (FlexLoRA's per-client truncations)
    "reinit-heterogeneous": ["lora.ranks=[2,4,6]", 'federation.scheme="reinit"'],
}


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
    monkeypatch.setattr(run_setup, "load_model", lambda name, dtype, device: tiny_llama(0))


def global_adapters(rundir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every adapter the server wrote (rounds/NNN/<branch>/...), keyed by its path and name."""
    tensors = {}
    for f in sorted((rundir / "rounds").rglob("adapter_model.safetensors")):
        relative = f.parent.relative_to(rundir / "rounds")
        if relative.parts[1] == "clients":  # the clients' own uploads are not the server's output
            continue
        for key, t in load_file(f).items():
            tensors[f"{relative.as_posix()}:{key}"] = t
    return tensors


@pytest.mark.parametrize("case", sorted(CASES))
def test_global_adapters_match_the_pinned_ones(tmp_path, case):
    overrides = [
        *TINY_RUN,
        *CASES[case],
        # the training the references were written with, so that a change of the defaults does not move them
        "train.epochs=2",
        'model.dtype="float32"',
        "federation.rounds=2",
        'federation.methods=["florist","flora","fedit","flexlora","ffa"]',
        'federation.thresholds="0.9,1.0"',
        'eval.questions="none"',
        "eval.heldout_loss=false",
        f'output="{tmp_path / case}"',
    ]
    rundir = run_module.run(load_config(None, overrides), progress=False, log=lambda m: None)
    got = global_adapters(rundir)
    reference = PINNED / f"{case}.safetensors"
    if os.environ.get("FLORIST_PIN") == "1":
        reference.parent.mkdir(parents=True, exist_ok=True)
        save_file(got, str(reference))
        pytest.skip(f"wrote {reference}")
    expected = load_file(reference)
    assert sorted(got) == sorted(expected)
    for key in expected:
        scale = float(expected[key].abs().max())
        moved = float((got[key] - expected[key]).abs().max())
        assert moved <= SUMMATION_ORDER * scale + 1e-7, f"{key}: moved by {moved:.3g}, {moved / scale:.2g} of its scale"
