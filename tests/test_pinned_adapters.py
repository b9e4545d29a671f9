"""Every method's global adapters on the tiny model, pinned: a change to the loop, the client, the engines or the
aggregation that alters what a run produces under the same seed fails here.

The references in ``tests/data/pinned/`` were written by this test with ``FLORIST_PIN=1`` (run it so only when a
change is meant to alter results, and say so in the commit). Training runs in float32 so that the comparison holds
across CPUs whose bfloat16 kernels round differently; the tolerance covers float32 summation order only.
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
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
