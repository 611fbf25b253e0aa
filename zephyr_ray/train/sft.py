"""Stage ``train_sft``: distilled SFT of the student on the synthesized dialogues, with TRL's ``SFTTrainer`` on
Ray Train workers under DeepSpeed ZeRO-3.

The dialogues train on every token by default, as Zephyr did (``assistant_only_loss: true`` trains on the
assistant turns only, through the template's ``{% generation %}`` marks). Either way each assistant turn's ``</s>``
is a label: the collator masks padding by position, not by token id, so pad == eos does not hide the stop token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import Hardware, Recipe, TrainSFTConfig
from ..data import is_complete, read_contract
from ..stage import StageResult, Timer, already_done, stage_section
from .loop import (
    finish,
    loop_config,
    resume_checkpoint,
    run_torch_trainer,
    train_with_ray,
    trainer_arguments,
    worker_inputs,
)

logger = logging.getLogger(__name__)


def sft_config(cfg: TrainSFTConfig, hardware: Hardware, output_dir: str, extra: dict[str, Any], tokenizer: Any,
               load_universal: bool = False) -> Any:
    """TRL's SFTConfig for a recipe's train_sft section (the recipe's ``trl_args`` win over every field)."""
    from trl import SFTConfig

    return SFTConfig(**trainer_arguments(cfg, hardware, output_dir, extra, load_universal, packing=cfg.packing,
                                         packing_strategy=cfg.packing_strategy,
                                         assistant_only_loss=cfg.assistant_only_loss, eos_token=tokenizer.eos_token))


def sft_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: TRL's SFTTrainer on the dialogues' ``messages``."""
    from trl import SFTTrainer

    recipe: Recipe = config["recipe"]
    cfg = recipe.train_sft
    extra, tokenizer, train = worker_inputs(config, cfg)
    resume_from, universal = resume_checkpoint(cfg.zero_stage)
    args = sft_config(cfg, recipe.hardware, config["output_dir"], extra, tokenizer, universal)
    peft_config = None
    if cfg.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=config["model"], args=args, train_dataset=train.select_columns(["messages"]),
                         processing_class=tokenizer, peft_config=peft_config)
    train_with_ray(trainer, resume_from, config, universal)


def run_train_sft(recipe: Recipe, run_dir: Path) -> StageResult:
    """``synthesize/dialogues`` -> ``train_sft/model`` (a plain HF model directory) + checkpoints under ``ray/``."""
    cfg = stage_section(recipe, "train_sft")
    out = run_dir / "train_sft" / "model"
    if done := already_done("train_sft", run_dir, {"model": out}):
        return done
    dialogues = run_dir / "synthesize" / "dialogues"
    if not is_complete(dialogues):
        raise FileNotFoundError(f"train_sft: no finished dialogues at {dialogues}; run `synthesize` first")
    if cfg.model is None:
        raise ValueError("train_sft.model: the student model to fine-tune is not set")
    timer = Timer()
    rows = read_contract(dialogues).count()
    files = sorted(str(p) for p in dialogues.glob("*.parquet"))
    result = run_torch_trainer("train_sft", sft_worker, loop_config("train_sft", recipe, cfg.model, files, run_dir),
                               recipe, cfg, run_dir)
    data = {"dialogues": str(dialogues), "rows": rows}
    return finish("train_sft", result, recipe, cfg, cfg.model, data, run_dir, timer.seconds)
