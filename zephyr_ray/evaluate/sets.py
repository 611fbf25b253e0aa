"""The evaluation's sets: MT-Bench questions (reference answers merged in), pairwise instructions and exact-match
questions, validated once into ``evaluate/`` (rejects beside them); and the screen that keeps them out of training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import EvaluateConfig, Recipe
from ..data import (
    InstructionRow,
    QuestionRow,
    ReferenceAnswerRow,
    ReferenceQuestionRow,
    read_rows,
    validated_once,
)
from ..decontaminate import Screen


@dataclass
class EvaluationSets:
    questions: list[dict[str, Any]]  # QuestionRow, ``reference`` from the reference answers where they have one
    instructions: list[dict[str, Any]]  # InstructionRow; from the questions' first turns when pairwise has no prompts
    counts: dict[str, Any]
    checkable: list[dict[str, Any]] = field(default_factory=list)  # ReferenceQuestionRow (exact match)



def _natural(value: str) -> tuple:
    return (0, int(value), "") if value.isdigit() else (1, 0, value)



def evaluation_sets(cfg: EvaluateConfig, run_dir: Path) -> EvaluationSets:
    """Validate the evaluation's question and instruction sets into ``evaluate/`` (once; rejects beside them)."""
    stage_dir = run_dir / "evaluate"
    counts: dict[str, Any] = {}
    questions: list[dict[str, Any]] = []
    if cfg.mt_bench is not None:
        counts["questions"] = validated_once(cfg.mt_bench.questions, QuestionRow, stage_dir / "questions",
                                             stage_dir / "question_rejects")
        questions = sorted(read_rows(stage_dir / "questions"), key=lambda q: _natural(q["question_id"]))
        if cfg.mt_bench.reference_answers is not None:
            counts["reference_answers"] = validated_once(
                cfg.mt_bench.reference_answers, ReferenceAnswerRow, stage_dir / "reference_answers",
                stage_dir / "reference_rejects")
            references = {r["question_id"]: r["turns"] for r in read_rows(stage_dir / "reference_answers")}
            # the answers file gives a turn's reference where it has one (FastChat's gen_judgment reads only that
            # file); the question's own `reference` fills the turns it lacks
            for question in questions:
                given, answered = question["reference"] or [], references.get(question["question_id"]) or []
                merged = [(answered[i] if i < len(answered) else None) or (given[i] if i < len(given) else None)
                          for i in range(max(len(given), len(answered)))]
                question["reference"] = merged if any(merged) else None
    instructions: list[dict[str, Any]] = []
    if cfg.pairwise is not None and cfg.pairwise.prompts is not None:
        counts["instructions"] = validated_once(cfg.pairwise.prompts, InstructionRow, stage_dir / "instructions",
                                                stage_dir / "instruction_rejects")
        instructions = sorted(read_rows(stage_dir / "instructions"), key=lambda r: r["instruction_id"])
    elif cfg.pairwise is not None:
        instructions = [{"instruction": q["turns"][0], "instruction_id": f"mt_bench:{q['question_id']}",
                         "output": None, "generator": None, "dataset": "mt_bench"} for q in questions]
    checkable: list[dict[str, Any]] = []
    if cfg.exact_match is not None:
        counts["exact_match_questions"] = validated_once(cfg.exact_match.questions, ReferenceQuestionRow,
                                                         stage_dir / "exact_match_questions",
                                                         stage_dir / "exact_match_rejects")
        checkable = read_rows(stage_dir / "exact_match_questions")
    return EvaluationSets(questions, instructions, counts, checkable)


def evaluation_prompts(sets: EvaluationSets) -> list[tuple[str, str]]:
    """(name, text) of every prompt the evaluation asks: each MT-Bench turn, pairwise instruction and exact-match
    question."""
    prompts = [(f"mt_bench {q['question_id']} turn {i}", turn)
               for q in sets.questions for i, turn in enumerate(q["turns"], start=1)]
    prompts += [(f"pairwise {row['instruction_id'][:12]}", row["instruction"]) for row in sets.instructions]
    prompts += [(f"exact_match {row['question_id'][:12]}", row["question"]) for row in sets.checkable]
    return prompts


def training_screen(recipe: Recipe, run_dir: Path) -> Screen | None:
    """The screen for this recipe's training prompts, or None when its ``evaluate.decontaminate`` is not set.

    The evaluation sets are validated into ``evaluate/`` here (once), so the evaluate stage reads the same rows."""
    cfg = recipe.evaluate
    if cfg is None or cfg.decontaminate is None:
        return None
    return Screen.build(evaluation_prompts(evaluation_sets(cfg, run_dir)), cfg.decontaminate.ngram,
                        cfg.decontaminate.drop)
