"""The benchmark scripts in --quick mode: they run, print their ratio lines and append to a results file.

Only the output is checked, never the speed: timings on a shared test machine mean nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "moe_layer.py": ["ratio ummrm/qwen2_moe[eager] time:", "ratio ummrm/qwen2_moe[grouped_mm] time:"],
    "train_step.py": ["ratio moe/dense step time:", "ratio moe/dense FLOPs (analytic):", "ratio (moe/dense step time) / (FLOPs ratio):"],
}


def run_quick(script: str, results: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--repeats", "2", "--results", str(results)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("script", sorted(CASES))
def test_quick_run_prints_ratios(script, tmp_path):
    results = tmp_path / "RESULTS.md"
    result = run_quick(script, results)
    assert result.returncode == 0, f"{script} --quick failed:\n{result.stderr[-4000:]}"

    ratio_lines = [line for line in result.stdout.splitlines() if line.startswith("ratio ")]
    for prefix in CASES[script]:
        assert any(line.startswith(prefix) for line in ratio_lines), f"no line starting {prefix!r} in:\n{result.stdout}"
    for line in ratio_lines:
        assert "median" in line or "(analytic)" in line, f"ratio line without a median: {line}"

    text = results.read_text()
    assert text.startswith("# Benchmark results")
    assert "(quick)" in text
    assert f"benchmarks/{script} --quick" in text


def test_second_run_appends_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    for _ in range(2):
        assert run_quick("moe_layer.py", results).returncode == 0
    text = results.read_text()
    assert text.count("# Benchmark results") == 1
    assert text.count("\n## ") == 2
