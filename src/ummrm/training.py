"""Training reward models with the Bradley-Terry loss on the Hugging Face ``Trainer``.

Why ``transformers.Trainer`` and not TRL's ``RewardTrainer`` (TRL 1.16): TRL reads the reward through
the model's own pooling, which picks the last token that is not the pad token, so with SmolLM2's
pad = end-of-turn it reads the wrong position; it drops pairs longer than ``max_length`` instead of
truncating them; and it has no place for the MoE load-balancing loss. The ``Trainer`` still gives
what users expect: progress bar, logging, checkpoints, resumption, and ``accelerate``/DDP launch.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ummrm.errors import UmmrmError
from ummrm.families import decoder_layers
from ummrm.losses import bradley_terry_loss, centering_loss, expert_slot_fractions, load_balancing_loss
from ummrm.moe import moe_layers, routing_mask
from ummrm.rewards import EncodedPair, forward_rewards, pad_sequences

logger = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Settings of one training stage; the config module documents each field for users."""

    learning_rate: float = 1e-5
    epochs: float = 1.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    center_coef: float = 0.0
    router_aux_loss_coef: float = 0.0
    trainable_layers: int = -1
    logging_steps: int = 10
    save_steps: int = 200
    collapse_threshold: float = 0.95
    seed: int = 0


class PairDataset(Dataset):
    def __init__(self, pairs: list[EncodedPair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        return {"chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids}


class PairCollator:
    """Pads a batch of pairs into one (2 * batch, longest) tensor: chosen rows first, then rejected."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        sequences = [feature["chosen_ids"] for feature in features] + [feature["rejected_ids"] for feature in features]
        input_ids, attention_mask = pad_sequences(sequences, self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def freeze_lower_layers(model: nn.Module, trainable_layers: int) -> int:
    """Train only the last ``trainable_layers`` blocks, the final norm and the score head; -1 trains all.

    Returns the number of trainable parameters. Merge logits, when present, stay as they are.
    """
    if trainable_layers < 0:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return sum(parameter.numel() for parameter in model.parameters())
    blocks = decoder_layers(model)
    if trainable_layers > len(blocks):
        raise UmmrmError(f"trainable_layers={trainable_layers} is larger than the model's {len(blocks)} blocks; use -1 to train all.")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = [model.score] + list(blocks[len(blocks) - trainable_layers :])
    backbone = model.base_model
    for name in ("norm", "ln_f", "final_layer_norm"):
        if isinstance(getattr(backbone, name, None), nn.Module):
            trainable.append(getattr(backbone, name))
    for module in trainable:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def _trainer_class():
    # built on first use so that importing ummrm does not import transformers' Trainer
    from transformers import Trainer

    class RewardModelTrainer(Trainer):
        """``Trainer`` with the Bradley-Terry loss, reward centring and the MoE load-balancing loss."""

        def __init__(self, *args, settings: TrainSettings, **kwargs):
            super().__init__(*args, **kwargs)
            self.settings = settings
            self._metrics: dict[str, list[float]] = defaultdict(list)
            self._collapse_warned: set[int] = set()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            attention_mask = inputs["attention_mask"]
            rewards = forward_rewards(model, inputs["input_ids"], attention_mask)
            chosen, rejected = rewards.chunk(2)

            loss = bradley_terry_loss(chosen, rejected)
            if self.settings.center_coef:
                loss = loss + self.settings.center_coef * centering_loss(chosen, rejected)
            aux_loss = self._aux_loss(model, attention_mask)
            if aux_loss is not None and self.settings.router_aux_loss_coef:
                loss = loss + self.settings.router_aux_loss_coef * aux_loss

            self._record(chosen.detach(), rejected.detach(), aux_loss)
            return (loss, {"rewards": rewards}) if return_outputs else loss

        def _aux_loss(self, model, attention_mask):
            layers = moe_layers(self.accelerator.unwrap_model(model))
            if not layers:
                return None
            mask = routing_mask(attention_mask)
            losses = []
            for index, moe in layers:
                losses.append(load_balancing_loss(moe.router_logits, moe.selected_experts, mask))
                fractions = expert_slot_fractions(moe.selected_experts.detach(), mask, moe.num_experts)
                for expert, fraction in enumerate(fractions.tolist()):
                    self._metrics[f"share/b{index}/e{expert}"].append(fraction)
            # averaged over layers so that balanced routing gives 1.0 whatever the layer count
            return torch.stack(losses).mean()

        def _record(self, chosen, rejected, aux_loss) -> None:
            self._metrics["accuracy"].append((chosen > rejected).float().mean().item())
            self._metrics["margin"].append((chosen - rejected).mean().item())
            self._metrics["rewards/chosen"].append(chosen.mean().item())
            self._metrics["rewards/rejected"].append(rejected.mean().item())
            if aux_loss is not None:
                self._metrics["aux_loss"].append(aux_loss.item())

        def log(self, logs, start_time=None):
            averaged = {key: sum(values) / len(values) for key, values in self._metrics.items() if values}
            self._metrics.clear()
            self._warn_on_collapse(averaged)
            super().log({**logs, **averaged}, start_time)

        def _warn_on_collapse(self, averaged: dict[str, float]) -> None:
            shares = defaultdict(list)
            for key, value in averaged.items():
                if key.startswith("share/"):
                    shares[int(key.split("/")[1][1:])].append(value)
            for index, fractions in shares.items():
                top_k = self._top_k(index)
                top_share = sum(sorted(fractions, reverse=True)[:top_k])
                if len(fractions) > top_k and top_share >= self.settings.collapse_threshold and index not in self._collapse_warned:
                    self._collapse_warned.add(index)
                    logger.warning(
                        "routing in block %d has collapsed: its top %d expert(s) take %.1f%% of routed slots "
                        "(shares %s); raise router_aux_loss_coef or lower the learning rate",
                        index, top_k, 100 * top_share, ", ".join(f"{value:.3f}" for value in fractions),
                    )

        def _top_k(self, index: int) -> int:
            for layer_index, moe in moe_layers(self.accelerator.unwrap_model(self.model)):
                if layer_index == index:
                    return moe.num_experts_per_tok
            return 1

        def _save(self, output_dir=None, state_dict=None):
            # save_pretrained does not know the MoE modules, so MoE checkpoints are written as plain
            # safetensors of every tensor, which Trainer's resumption loads back by name
            # NOTE: under DeepSpeed ZeRO-3 each process holds only a shard of each tensor, so this would
            # save shards; MoE stages under ZeRO-3 need the state dict gathered first (not done yet).
            model = self.accelerator.unwrap_model(self.model)
            if getattr(model, "moe_settings", None) is None:
                return super()._save(output_dir, state_dict)
            from safetensors.torch import save_model

            output_dir = Path(output_dir or self.args.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            save_model(model, str(output_dir / "model.safetensors"))
            torch.save(self.args, output_dir / "training_args.bin")

    return RewardModelTrainer


def training_arguments(output_dir: Path, settings: TrainSettings, save_checkpoints: bool = True, has_experts: bool = False):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps,
        lr_scheduler_type="linear",
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save_checkpoints else "no",
        save_steps=settings.save_steps,
        save_total_limit=1,
        seed=settings.seed,
        data_seed=settings.seed,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
        # under DDP a routed expert that no token chose in a step has no gradient, and DDP must expect that
        ddp_find_unused_parameters=has_experts,
    )


def train_reward_model(
    model: nn.Module,
    pad_token_id: int,
    pairs: list[EncodedPair],
    checkpoint_dir: Path,
    settings: TrainSettings,
    save_checkpoints: bool = True,
) -> dict:
    """Train ``model`` in place on encoded pairs; return the training summary.

    Checkpoints go to ``checkpoint_dir``; when one is there from an interrupted run, training resumes
    from it.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if not pairs:
        raise UmmrmError("no training pairs; check the data source and the split fractions.")
    trainable = freeze_lower_layers(model, settings.trainable_layers) if not _has_merge_logits(model) else sum(
        parameter.numel() for parameter in model.parameters() if parameter.requires_grad
    )

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    arguments = training_arguments(checkpoint_dir, settings, save_checkpoints, has_experts=bool(moe_layers(model)))
    trainer = _trainer_class()(
        model=model,
        args=arguments,
        train_dataset=PairDataset(pairs),
        data_collator=PairCollator(pad_token_id),
        settings=settings,
    )
    logger.info(
        "process %d of %d: training %d pairs, %d trainable parameters",
        arguments.process_index, arguments.world_size, len(pairs), trainable,
    )
    resume = get_last_checkpoint(str(checkpoint_dir)) if save_checkpoints else None
    if resume:
        logger.info("resuming from checkpoint %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    history = [entry for entry in trainer.state.log_history if "loss" in entry or "accuracy" in entry]
    return {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "pairs": len(pairs),
        "trainable_parameters": trainable,
        "final_log": history[-1] if history else {},
        "is_world_process_zero": trainer.is_world_process_zero(),
        "world_size": arguments.world_size,
    }


def _has_merge_logits(model: nn.Module) -> bool:
    return any(name.endswith("merge_logits") for name, _ in model.named_parameters())
