"""The pipeline end to end on a tiny random model: outputs, caching, and plain transformers loading."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from conftest import WORDS, save_tiny_base_model

from ummrm.config import PipelineConfig
from ummrm.errors import UmmrmError
from ummrm.models import load_reward_model
from ummrm.pipeline import run_pipeline
from ummrm.scoring import score_rows


def write_pairs(path, count: int = 48, seed: int = 0):
    generator = random.Random(seed)
    with path.open("w") as handle:
        for index in range(count):
            prompt = " ".join(generator.choices(WORDS, k=4)) + f" {WORDS[index % 7]}"
            tail = " ".join(generator.choices(WORDS, k=3))
            handle.write(json.dumps({"prompt": prompt, "chosen": f"good answer {tail}", "rejected": f"bad answer {tail} no"}) + "\n")
    return path


def tiny_pipeline_config(tmp_path) -> PipelineConfig:
    config = PipelineConfig()
    config.model = str(save_tiny_base_model(tmp_path / "base"))
    config.output_dir = str(tmp_path / "run")
    config.data.source = str(write_pairs(tmp_path / "pairs.jsonl"))
    config.data.max_length = 32
    config.data.eval_fraction = 0.25
    config.data.calibration_fraction = 0.2
    for stage in (config.dense, config.moe):
        stage.learning_rate = 1e-3
        stage.batch_size = 4
        stage.logging_steps = 2
        stage.save_steps = 4
    config.upcycle.num_experts = 3
    config.upcycle.layers = "last:2"
    config.merge.statistics_pairs = 8
    config.evaluate.bootstrap_samples = 50
    return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pipeline")
    config = tiny_pipeline_config(tmp_path)
    metrics = run_pipeline(config)
    return config, metrics, tmp_path


def test_pipeline_writes_every_stage(finished_run):
    config, metrics, tmp_path = finished_run
    run = tmp_path / "run"
    assert (run / "dense" / "model.safetensors").is_file()
    assert (run / "moe" / "moe_config.json").is_file()
    assert not (run / "merged" / "moe_config.json").exists()
    assert set(metrics["accuracy"]) == {"dense", "moe", "merged"}
    saved = json.loads((run / "metrics.json").read_text())
    for stage in ("data", "dense", "moe", "merged", "evaluate_dense"):
        assert saved["stages"][stage]["seconds"] >= 0
        assert saved["stages"][stage]["peak_rss_mib"] > 0
    assert saved["config"]["upcycle"]["num_experts"] == 3
    assert saved["versions"]["torch"]
    assert saved["seeds"]["upcycle"] == config.upcycle.seed
    assert saved["data"]["splits"]["eval"] > 0


def test_same_held_out_pairs_for_all(finished_run):
    _, metrics, _ = finished_run
    counts = {name: result["pairs"] for name, result in metrics["accuracy"].items()}
    assert len(set(counts.values())) == 1, counts


def test_upcycle_check_recorded(finished_run):
    _, metrics, _ = finished_run
    check = metrics["stages"]["moe"]["result"]["upcycle_check"]
    assert check["max_reward_difference"] <= 1e-5


def test_rerun_recomputes_nothing(finished_run, caplog):
    config, _, tmp_path = finished_run
    run = tmp_path / "run"
    before = {name: (run / name / "model.safetensors").stat().st_mtime_ns for name in ("dense", "moe", "merged")}
    with caplog.at_level("INFO", logger="ummrm.pipeline"):
        run_pipeline(config)
    after = {name: (run / name / "model.safetensors").stat().st_mtime_ns for name in ("dense", "moe", "merged")}
    assert before == after
    assert sum("not running it again" in record.message for record in caplog.records) == 3


def test_changed_settings_rejected(finished_run):
    config, _, _ = finished_run
    config.dense.learning_rate = 0.5
    try:
        with pytest.raises(UmmrmError, match="made with other settings"):
            run_pipeline(config)
    finally:
        config.dense.learning_rate = 1e-3


PLAIN_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.argv[2])
assert "ummrm" not in sys.modules
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
with torch.no_grad():
    print(json.dumps(model(**batch).logits[:, 0].tolist()))
assert "ummrm" not in sys.modules
"""


def test_merged_loads_with_plain_transformers(finished_run):
    _, _, tmp_path = finished_run
    folder = tmp_path / "run" / "merged"
    model, tokenizer = load_reward_model(str(folder))
    rows = [{"prompt": "why is the cat on the mat", "response": "because it is fine"},
            {"prompt": "hello", "response": "yes"},
            {"prompt": "a dog sat", "response": "good answer the dog sat on the mat no"}]
    expected = score_rows(model, tokenizer, rows)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}], tokenize=False) for row in rows]
    result = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(folder), json.dumps(texts)], capture_output=True, text=True, check=True)
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    differences = [abs(a - b) for a, b in zip(plain, expected)]
    assert max(differences) <= 1e-5, f"largest difference {max(differences)}"
