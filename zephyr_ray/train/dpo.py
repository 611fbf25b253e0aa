"""Stage ``train_dpo``: distilled DPO of the dSFT model on the preference pairs, with TRL's ``DPOTrainer`` on
Ray Train workers under DeepSpeed ZeRO-3. The reference is the frozen starting model: TRL loads it from the
policy's path (``ref_model=None``) and prepares it under the same DeepSpeed config, so it is sharded too; or
``train_dpo.reference`` (iterative rounds that keep the dSFT model as the reference), loaded the same way.

TRL 1.x truncates whole sequences but has no prompt limit of its own, so pairs whose prompt (rendered with the chat
template) is longer than ``max_prompt_length`` tokens go to ``train_dpo/rejects`` with that reason, before training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import Recipe
from ..data import is_complete
from ..stage import StageResult, Timer, already_done, stage_section
from .loop import (
    finish,
    load_tokenizer,
    loop_config,
    resume_checkpoint,
    run_torch_trainer,
    train_with_ray,
    trainer_arguments,
    worker_inputs,
)

logger = logging.getLogger(__name__)


def dpo_arguments(cfg: Any) -> dict[str, Any]:
    """The recipe's DPO settings as TRL's DPOConfig takes them."""
    return {"beta": cfg.beta, "loss_type": cfg.loss_types, "loss_weights": cfg.loss_weights}


def dpo_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: TRL's DPOTrainer on ``chosen``/``rejected`` chats (the shared prompt is implicit)."""
    from trl import DPOConfig, DPOTrainer

    recipe: Recipe = config["recipe"]
    cfg = recipe.train_dpo
    extra, tokenizer, train = worker_inputs(config, cfg)
    resume_from, universal = resume_checkpoint(cfg.zero_stage)
    args = DPOConfig(**trainer_arguments(cfg, recipe.hardware, config["output_dir"], extra, universal,
                                         **dpo_arguments(cfg)))
    reference = None
    if config["reference"]:  # loaded as TRL loads its default reference (after DPOConfig: under ZeRO-3 it is sharded)
        from trl.trainer.utils import create_model_from_path

        reference = create_model_from_path(config["reference"],
                                           **{**(args.model_init_kwargs or {}), "device_map": None})
    trainer = DPOTrainer(model=config["model"], ref_model=reference, args=args,
                         train_dataset=train.select_columns(["chosen", "rejected"]), processing_class=tokenizer)
    train_with_ray(trainer, resume_from, config, universal)


def split_by_prompt_length(preferences: Path, tokenizer: Any, max_prompt_length: int, kept: Path,
                           rejects: Path) -> dict[str, int]:
    """Pairs whose prompt fits ``max_prompt_length`` tokens -> ``kept``; the others -> ``rejects`` with the reason."""
    import datasets

    from ..data import write_table_atomic

    pairs = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in preferences.glob("*.parquet")),
                                  split="train")

    def measure(row: dict[str, Any]) -> dict[str, Any]:
        ids = tokenizer.apply_chat_template(row["chosen"][:-1], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        too_long = len(ids) > max_prompt_length
        return {"reason": f"prompt is {len(ids)} tokens, over max_prompt_length {max_prompt_length}"
                if too_long else None}

    measured = pairs.map(measure)
    fits = measured.filter(lambda r: r["reason"] is None).remove_columns("reason")
    long = measured.filter(lambda r: r["reason"] is not None).select_columns(["prompt_id", "prompt", "reason"])
    # a filtered `datasets.Dataset` is its whole table plus the kept rows' indices: flattened, only those rows
    write_table_atomic(fits.flatten_indices().data.table, kept)
    write_table_atomic(long.flatten_indices().data.table, rejects)
    return {"pairs": len(pairs), "kept": len(fits), "rejected": len(long)}


def run_train_dpo(recipe: Recipe, run_dir: Path) -> StageResult:
    """``binarize/preferences`` -> ``train_dpo/model``, starting from ``train_dpo.model`` or the dSFT model."""
    cfg = stage_section(recipe, "train_dpo")
    out = run_dir / "train_dpo" / "model"
    if done := already_done("train_dpo", run_dir, {"model": out}):
        return done
    preferences = run_dir / "binarize" / "preferences"
    if not is_complete(preferences):
        raise FileNotFoundError(f"train_dpo: no finished preference pairs at {preferences}; run `binarize` first")
    base = cfg.model or str(run_dir / "train_sft" / "model")
    if cfg.model is None and not is_complete(base):
        raise FileNotFoundError(f"train_dpo: no dSFT model at {base}; run `train_sft` first or set train_dpo.model")
    timer = Timer()
    kept, rejects = run_dir / "train_dpo" / "data", run_dir / "train_dpo" / "rejects"
    counts = split_by_prompt_length(preferences, load_tokenizer(base, cfg), cfg.max_prompt_length, kept, rejects)
    logger.info("train_dpo: %d pairs, %d train, %d rejected (prompt too long)", counts["pairs"], counts["kept"],
                counts["rejected"])
    if not counts["kept"]:
        raise ValueError(f"train_dpo: no preference pair to train on ({counts['pairs']} in {preferences}, "
                         f"{counts['rejected']} of them over max_prompt_length): binarize pairs a prompt only when its "
                         "completions' scores differ; more completions per prompt (or a rounds' `samples`) give more")
    files = sorted(str(p) for p in kept.glob("*.parquet"))
    result = run_torch_trainer("train_dpo", dpo_worker,
                               loop_config("train_dpo", recipe, base, files, run_dir, reference=cfg.reference),
                               recipe, cfg, run_dir)
    data = {"preferences": str(preferences), "rows": counts["kept"], "rejected_long_prompts": counts["rejected"]}
    return finish("train_dpo", result, recipe, cfg, base, data, run_dir, timer.seconds)
