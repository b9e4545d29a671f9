"""bench/gpu.py, the check a GPU machine runs, kept working: its every step on the CPU with a 2-layer model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from florist.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_every_method_scores_and_steps_on_the_device(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (result,) = data["results"]
    training, scoring, step = result["training"], result["scoring"], result["server_step"]
    # every registered method trained and was aggregated in round 1, through florist's own loop
    assert training["methods"] == sorted(METHODS) and training["missing_methods"] == []
    assert training["client_jobs"] >= 8 and training["tokens"] > 0
    assert 0 < training["mfu"] < 1  # executed FLOPs against the measured matmul rate
    assert scoring["questions"] == 8 and scoring["questions_per_second"] > 0
    # the server step ran where its tensors were, and on the CPU equals the CPU's own result
    assert step["device"] == "cpu" and step["modules"] == 4 and step["max_rel_difference_from_cpu"] == 0.0
    assert data["table"]["rows"][0][0].startswith("tiny")
    assert "| model | tokens/s |" in proc.stdout
