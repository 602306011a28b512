"""The smoke preset's dense stage under `accelerate launch` with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_integration import HH_FILE, ROOT, pytestmark  # noqa: F401  (same skip rules as the integration tests)

from ummrm.models import load_reward_model


def test_dense_stage_on_two_processes(tmp_path):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert launcher, "the accelerate command is missing; it comes with `pip install accelerate`"
    output = tmp_path / "run"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [launcher, "launch", "--config_file", "configs/accelerate/cpu-2proc.yaml", "-m", "ummrm.cli",
         "pipeline", "--config", "configs/smoke.yaml", "--data", str(HH_FILE), "--output-dir", str(output), "--until", "dense"],
        capture_output=True, text=True, env=environment, cwd=ROOT, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    # each process logs its rank when it starts training
    assert "process 0 of 2" in result.stderr
    assert "process 1 of 2" in result.stderr

    metadata = json.loads((output / "dense" / "ummrm.json").read_text())
    assert metadata["training"]["world_size"] == 2
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"dense"}
    assert result.stdout.count("| dense |") == 1

    model, tokenizer = load_reward_model(str(output / "dense"))
    assert model.config.num_labels == 1
    assert tokenizer.pad_token_id == model.config.pad_token_id
