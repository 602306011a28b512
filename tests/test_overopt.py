"""The over-optimisation experiment end to end on tiny random models, its cache and its config."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest

from conftest import WORDS, save_tiny_base_model
from ummrm.errors import UmmrmError
from ummrm.overopt import (
    OveroptConfig,
    load_overopt_config,
    plan_overopt,
    run_overopt,
    write_preferences,
)
from ummrm.prompts import Prompt, load_prompts, split_prompts


def _sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("overopt")
    base = save_tiny_base_model(root / "base")
    rng = random.Random(0)
    instructions = [{"instruction": f"{_sentence(rng, 4)} {index}", "input": ""} for index in range(30)]
    (root / "instructions.json").write_text(json.dumps(instructions))
    with (root / "gold-pairs.jsonl").open("w") as handle:
        for index in range(40):
            row = {"prompt": f"{_sentence(rng, 3)} {index}", "chosen": _sentence(rng, 5), "rejected": _sentence(rng, 5)}
            handle.write(json.dumps(row) + "\n")
    return root, base


def tiny_config(root, base, output) -> OveroptConfig:
    config = OveroptConfig(model=str(base), output_dir=str(output))
    config.policy.model = str(base)
    config.policy.max_new_tokens = 6
    config.policy.max_prompt_tokens = 16
    config.policy.batch_size = 8
    config.prompts.source = str(root / "instructions.json")
    config.prompts.num_train = 20
    config.prompts.num_held_out = 4
    config.gold.base_model = str(base)
    config.gold_data.source = str(root / "gold-pairs.jsonl")
    config.gold_data.data_dir = None
    config.gold_data.eval_fraction = 0.2
    config.gold_data.calibration_fraction = 0.0
    config.gold_data.max_length = 32
    config.data.max_length = 32
    config.data.eval_fraction = 0.2
    config.data.calibration_fraction = 0.2
    for section in (config.gold_training, config.dense, config.moe):
        section.batch_size = 4
        section.learning_rate = 1e-3
        section.trainable_layers = 1
        section.save_steps = 1000
        section.logging_steps = 1
    config.upcycle.layers = "last:1"
    config.merge.batch_size = 4
    config.merge.statistics_pairs = 8
    config.evaluate.bootstrap_samples = 50
    config.ensemble.members = 2
    config.bon.pool_size = 4
    config.bon.batch_size = 8
    config.bon.bootstrap_samples = 50
    config.bon.timing_responses = 4
    return config


@pytest.fixture(scope="module")
def tiny_run(tiny_setup, tmp_path_factory):
    root, base = tiny_setup
    output = tmp_path_factory.mktemp("run") / "out"
    record = run_overopt(tiny_config(root, base, output))
    return root, base, output, record


def _read_bon(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_run_writes_every_output(tiny_run):
    _, _, output, record = tiny_run
    for name in ("prompts.json", "bon.csv", "costs.csv", "gold.png", "proxy.png", "report.md", "overopt.json"):
        assert (output / name).is_file(), name
    for name in ("dense", "moe", "merged", "merged-frequency", "merged-uniform", "member-1", "warm"):
        assert (output / "proxies" / name / "config.json").is_file(), name
    rows = _read_bon(output / "bon.csv")
    methods = {row["method"] for row in rows}
    assert methods == {"dense", "warm", "moe", "merged", "merged-frequency", "merged-uniform",
                       "ensemble-mean", "ensemble-worst", "ensemble-uncertainty", "gold"}
    assert {row["n"] for row in rows} == {"1", "2", "4"}
    assert record["prompts"] == {"train": 20, "held_out": 4}
    report = (output / "report.md").read_text()
    assert "![gold score against KL](gold.png)" in report


def test_n1_is_same_for_every_method(tiny_run):
    _, _, output, _ = tiny_run
    rows = [row for row in _read_bon(output / "bon.csv") if row["n"] == "1"]
    assert len({row["gold_mean"] for row in rows}) == 1
    assert all(float(row["kl"]) == 0.0 for row in rows)
    assert all(float(row["gold_vs_n1"]) == 0.0 for row in rows)


def test_gold_method_is_the_ceiling(tiny_run):
    _, _, output, _ = tiny_run
    rows = _read_bon(output / "bon.csv")
    largest = max(int(row["n"]) for row in rows)
    at_largest = {row["method"]: float(row["gold_mean"]) for row in rows if int(row["n"]) == largest}
    assert all(value <= at_largest["gold"] + 1e-9 for value in at_largest.values())


def test_trunk_cache_matches_plain_scoring(tiny_run):
    from ummrm.models import load_reward_model
    from ummrm.rewards import RewardEncoder, score_sequences

    _, _, output, record = tiny_run
    assert record["trunk_cache"]["replayed"] >= 1
    held_out = [Prompt.from_json(item) for item in json.loads((output / "prompts.json").read_text())["value"]["held_out"]]
    pool = [json.loads(line)["responses"] for line in (output / "pool" / "samples.jsonl").read_text().splitlines()]
    model, tokenizer = load_reward_model(str(output / "proxies" / "merged"))
    encoder = RewardEncoder(tokenizer, 32)
    sequences = [encoder.encode(prompt.messages, "", response, True) for prompt, group in zip(held_out, pool) for response in group]
    plain = score_sequences(model, sequences, tokenizer.pad_token_id)
    stored = json.loads((output / "scores" / "merged.json").read_text())["value"]["scores"]
    assert np.allclose(np.ravel(stored), plain, atol=1e-5)


def test_rerun_recomputes_nothing(tiny_run, monkeypatch):
    import ummrm.generation
    import ummrm.models
    import ummrm.training

    root, base, output, _ = tiny_run
    before = (output / "bon.csv").read_text()

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached step was computed again")

    monkeypatch.setattr(ummrm.training, "train_reward_model", forbidden)
    monkeypatch.setattr(ummrm.generation, "load_policy", forbidden)
    monkeypatch.setattr(ummrm.models, "load_reward_model", forbidden)
    first = json.loads((output / "overopt.json").read_text())
    run_overopt(tiny_config(root, base, output))
    assert (output / "bon.csv").read_text() == before

    # the re-run's near-zero step times are added to the first run's, not written over them
    record = json.loads((output / "overopt.json").read_text())
    assert [invocation["steps"] for invocation in record["invocations"][:1]] == [first["steps"]]
    assert len(record["invocations"]) == 2
    for name, step in record["steps_total"].items():
        expected = first["steps"][name]["seconds"] + record["steps"][name]["seconds"]
        assert step["seconds"] == pytest.approx(expected, abs=0.011)
    assert "summed and maximised over the 2 invocation(s)" in (output / "report.md").read_text()


def test_same_seed_same_table(tiny_run, tmp_path):
    root, base, output, _ = tiny_run
    run_overopt(tiny_config(root, base, tmp_path / "again"))
    first = [{k: v for k, v in row.items()} for row in _read_bon(output / "bon.csv")]
    second = [{k: v for k, v in row.items()} for row in _read_bon(tmp_path / "again" / "bon.csv")]
    assert first == second


def test_changed_settings_are_an_error(tiny_run):
    root, base, output, _ = tiny_run
    config = tiny_config(root, base, output)
    config.labels.noise = 0.1
    with pytest.raises(UmmrmError, match="other settings"):
        run_overopt(config)


def test_preferences_follow_gold_and_flip(tmp_path):
    prompts = [Prompt(({"role": "user", "content": f"q{index}"},)) for index in range(400)]
    responses = [[f"a{index}", f"b{index}"] for index in range(400)]
    scores = [[1.0, 0.0]] * 400
    counts = write_preferences(prompts, responses, scores, type("Labels", (), {"noise": 0.25, "seed": 0})(), tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert counts["pairs"] == 400
    flipped = [row for row in rows if row["flipped"]]
    assert len(flipped) == counts["flipped"]
    # 25% flips of 400: well within 4 standard deviations (sd ~ 8.7)
    assert 65 <= counts["flipped"] <= 135
    assert all(row["chosen"].startswith("b") for row in flipped)
    assert all(row["chosen"].startswith("a") for row in rows if not row["flipped"])


def test_preferences_skip_ties_and_identical(tmp_path):
    prompts = [Prompt(({"role": "user", "content": f"q{index}"},)) for index in range(3)]
    responses = [["same", "same"], ["x", "y"], ["x", "z"]]
    scores = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    counts = write_preferences(prompts, responses, scores, type("Labels", (), {"noise": 0.0, "seed": 0})(), tmp_path / "p.jsonl")
    assert counts == {"pairs": 1, "flipped": 0, "identical_responses": 1, "gold_ties": 1}


def test_config_rejects_data_source(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  source: pairs.jsonl\n")
    with pytest.raises(UmmrmError, match="data.source cannot be set"):
        load_overopt_config(path)


def test_config_rejects_unknown_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bon:\n  pool: 8\n")
    with pytest.raises(UmmrmError, match="bon.pool"):
        load_overopt_config(path)


def test_member_learning_rates_checked(tiny_setup, tmp_path):
    root, base = tiny_setup
    config = tiny_config(root, base, tmp_path / "out")
    config.ensemble.learning_rates = "1e-3,2e-3,3e-3"
    with pytest.raises(UmmrmError, match="3 values for 2 members"):
        plan_overopt(config)
    config.ensemble.learning_rates = "5e-4,2e-3"
    with pytest.raises(UmmrmError, match="member 0 is the dense proxy"):
        plan_overopt(config)


def test_dry_run_lists_work_and_checks_paths(tiny_setup, tmp_path):
    root, base = tiny_setup
    config = tiny_config(root, base, tmp_path / "out")
    lines = "\n".join(plan_overopt(config))
    assert "30 distinct prompts: 20 for training, 4 held out" in lines
    assert "4 held-out prompts x 4 samples = 16 samples" in lines
    assert not (tmp_path / "out").exists()
    config.gold.model = str(tmp_path / "missing-gold")
    with pytest.raises(UmmrmError, match="missing-gold not found"):
        plan_overopt(config)


def test_prompts_from_every_kind_of_source(tmp_path):
    (tmp_path / "instructions.json").write_text(json.dumps([
        {"instruction": "Translate", "input": "hello"}, {"instruction": "", "input": "x"}, {"instruction": "Translate", "input": "hello"},
    ]))
    prompts = load_prompts(str(tmp_path / "instructions.json"))
    assert [prompt.messages[-1]["content"] for prompt in prompts] == ["Translate\n\nhello"]
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}) + "\n"
    )
    prompts = load_prompts(str(tmp_path / "prompts.jsonl"))
    assert len(prompts) == 2
    assert len(prompts[1].messages) == 3
    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps({"prompt": "p", "chosen": c, "rejected": r}) + "\n" for c, r in (("a", "b"), ("c", "d")))
    )
    assert len(load_prompts(str(tmp_path / "pairs.jsonl"))) == 1


def test_split_prompts_disjoint_and_seeded():
    prompts = [Prompt(({"role": "user", "content": str(index)},)) for index in range(50)]
    train, held_out = split_prompts(prompts, 10, 30, seed=3)
    assert len(train) == 30
    assert len(held_out) == 10
    assert not {p.key for p in train} & {p.key for p in held_out}
    assert split_prompts(list(reversed(prompts)), 10, 30, seed=3) == (train, held_out)
    with pytest.raises(UmmrmError, match="fewer than the 61 needed"):
        split_prompts(prompts, 10, 51, seed=0)


def test_sampling_resumes_after_interruption(tiny_setup, tmp_path):
    from ummrm.generation import SamplingSettings, sample_responses

    _, base = tiny_setup
    prompts = [Prompt(({"role": "user", "content": f"the cat {index}"},)) for index in range(6)]
    settings = SamplingSettings(max_new_tokens=4, batch_size=4, max_prompt_tokens=16)
    full = sample_responses(str(base), prompts, 2, settings, tmp_path / "a.jsonl")
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    # keep the first batch and a torn half line, as a crash would leave them
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    resumed = sample_responses(str(base), prompts, 2, settings, tmp_path / "b.jsonl")
    assert resumed == full
