"""FastChat's judge prompts (``judge_prompts.jsonl``: ``name``, ``type``, ``system_prompt``, ``prompt_template``,
``output_format``), read unchanged and used where FastChat's ``gen_judgment.py`` uses each one, so that an MT-Bench
score graded by GPT-4 through this project is FastChat's score:

- ``single-v1`` for turn 1 and ``single-v1-multi-turn`` for turn 2; ``single-math-v1`` / ``single-math-v1-multi-turn``
  instead for a question in ``mt_bench.reference_categories`` (math, reasoning, coding) with reference answers for
  every turn so far (falling back to the general ones when the file has no math prompt);
- ``pair-v2`` for the pairwise comparison (which judges first turns).

Their output formats (``[[rating]]``, ``[[A]]``) are what the project's own parsers read. A file that lacks a
prompt the evaluation needs, or whose template asks for a placeholder its slot does not fill, fails when the recipe
loads, naming the file, line and prompt.
"""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path
from typing import Any

# what FastChat fills into each prompt (gen_judgment.py / common.py), and the placeholders a template must use
SLOTS: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {
    # name: (output format, placeholders filled, placeholders required)
    "single-v1": ("[[rating]]", frozenset({"question", "answer"}), frozenset({"question", "answer"})),
    "single-math-v1": ("[[rating]]", frozenset({"question", "answer", "ref_answer_1"}),
                       frozenset({"question", "answer"})),
    "single-v1-multi-turn": ("[[rating]]", frozenset({"question_1", "answer_1", "question_2", "answer_2"}),
                             frozenset({"question_2", "answer_2"})),
    "single-math-v1-multi-turn": ("[[rating]]", frozenset({"question_1", "answer_1", "question_2", "answer_2",
                                                          "ref_answer_1", "ref_answer_2"}),
                                  frozenset({"question_2", "answer_2"})),
    "pair-v2": ("[[A]]", frozenset({"question", "answer_a", "answer_b"}), frozenset({"question", "answer_a",
                                                                                     "answer_b"})),
}
NEEDED_FOR = {"mt_bench": ("single-v1", "single-v1-multi-turn"), "pairwise": ("pair-v2",)}


def placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def read_judge_prompts(path: str | Path) -> dict[str, dict[str, str]]:
    """name -> {system_prompt, prompt_template, output_format} of the prompts this project uses; other prompts in
    the file (FastChat's pair-math-v1, older versions) are read and left alone."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such judge prompts file")
    found: dict[str, dict[str, str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        name = record.get("name") if isinstance(record, dict) else None
        if name not in SLOTS:
            continue
        fields = {key: record.get(key) for key in ("system_prompt", "prompt_template", "output_format")}
        missing = [key for key, value in fields.items() if not isinstance(value, str)]
        if missing:
            raise ValueError(f"{path}:{number}: prompt {name!r} has no {', '.join(missing)}")
        output_format, filled, required = SLOTS[name]
        if fields["output_format"] != output_format:
            raise ValueError(f"{path}:{number}: prompt {name!r} answers in {fields['output_format']!r}; this "
                             f"project reads {output_format!r} for it")
        try:
            used = placeholders(fields["prompt_template"])
        except ValueError as err:
            raise ValueError(f"{path}:{number}: prompt {name!r}: {err}") from None
        if used - filled or required - used:
            raise ValueError(f"{path}:{number}: prompt {name!r} uses {sorted(used)}; FastChat fills "
                             f"{sorted(filled)} into it and it needs {sorted(required)}")
        found[name] = fields
    return found


def check_needed(prompts: dict[str, Any], path: str, uses: list[str]) -> None:
    missing = [name for use in uses for name in NEEDED_FOR[use] if name not in prompts]
    if missing:
        raise ValueError(f"{path}: no {', '.join(repr(m) for m in missing)} prompt, which the evaluation's "
                         f"{' and '.join(uses)} need")


def prompts_version(path: str | Path) -> str:
    return f"judge prompts {Path(path).name} {hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]}"


def grading_prompt(prompts: dict[str, dict[str, str]], question: dict[str, Any], answers: list[str], turn: int,
                   references: list[str] | None) -> tuple[str, str, str]:
    """(prompt name, system prompt, user prompt) for grading ``turn`` (1 or 2) as FastChat does; ``references``
    the reference answers up to ``turn`` when the question's category takes them (None otherwise)."""
    multi = "-multi-turn" if turn > 1 else ""
    name = f"single-math-v1{multi}" if references and f"single-math-v1{multi}" in prompts else f"single-v1{multi}"
    values: dict[str, str] = {}
    if turn == 1:
        values.update(question=question["turns"][0], answer=answers[0])
    else:
        values.update(question_1=question["turns"][0], answer_1=answers[0], question_2=question["turns"][1],
                      answer_2=answers[1])
    if name.startswith("single-math"):
        values.update({f"ref_answer_{i + 1}": ref for i, ref in enumerate(references or [])})
    chosen = prompts[name]
    return name, chosen["system_prompt"], chosen["prompt_template"].format(**values)


def pairwise_prompt(prompts: dict[str, dict[str, str]], question: str, answer_a: str,
                    answer_b: str) -> tuple[str, str, str]:
    chosen = prompts["pair-v2"]
    return "pair-v2", chosen["system_prompt"], chosen["prompt_template"].format(
        question=question, answer_a=answer_a, answer_b=answer_b)
