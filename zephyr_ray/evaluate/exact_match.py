"""Verifiable evaluation: questions with reference answers (GSM8K's ``question`` / ``answer`` with ``#### <answer>``
read unchanged, or a plain ``answer`` column), the model's final answer taken out of its reply by a stated rule, and
accuracy per model with a bootstrap interval and the count of replies with no answer in them.

Rules (``answer_pattern``): ``gsm8k``, the text after the reply's last ``####`` (GSM8K's own marker); ``last_number``,
the reply's last number; any other value is a regular expression whose last match gives the answer (its first group
if it has one). Answers are compared as numbers when both read as numbers (``1,234``, ``$5``, ``72.0`` and ``72``
agree), else as text, trimmed and case-folded.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from ..statistics import bootstrap_interval

GSM8K_MARKER = "####"
# a sign only where it cannot be a hyphen ("2023-2024" is two numbers), the Unicode minus too; ".5" is a number
NUMBER = re.compile(r"(?<![\w.])[-\u2212]?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def reference_answer(answer: str) -> str:
    """The reference's final answer: after GSM8K's ``####`` when the reference has one (its worked solution comes
    first), else the whole value."""
    return answer.rsplit(GSM8K_MARKER, 1)[1].strip() if GSM8K_MARKER in answer else answer.strip()


def extract_answer(reply: str | None, rule: str) -> str | None:
    """The final answer in a model's reply by ``rule`` (see the module's docstring); None when it has none."""
    if not reply:
        return None
    if rule == "gsm8k":
        if GSM8K_MARKER not in reply:
            return None
        tail = reply.rsplit(GSM8K_MARKER, 1)[1].strip()
        number = NUMBER.search(tail)
        return number.group(0) if number else (tail.split("\n", 1)[0].strip() or None)
    if rule == "last_number":
        numbers = NUMBER.findall(reply)
        return numbers[-1] if numbers else None
    matches = list(re.finditer(rule, reply))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if last.re.groups else last.group(0)).strip() or None


def as_number(value: str) -> Decimal | None:
    """A number as written, exactly (a float would make 10000001 equal 10000000 within a tolerance)."""
    text = value.strip().replace(",", "").replace("$", "").replace("\u2212", "-").rstrip(".")
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def same_answer(predicted: str, reference: str) -> bool:
    left, right = as_number(predicted), as_number(reference)
    if left is not None and right is not None:
        return left == right  # 72 == 72.0, 3.5 == 3.50
    return predicted.strip().casefold() == reference.strip().casefold()


def check_pattern(rule: str) -> str:
    """A recipe's ``answer_pattern``: a rule name or a regular expression that compiles (else ValueError)."""
    if rule not in ("gsm8k", "last_number"):
        try:
            re.compile(rule)
        except re.error as err:
            raise ValueError(f"not a rule (gsm8k, last_number) nor a regular expression: {err}") from None
    return rule


def score(replies: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    """Each reply (``question_id``, ``reference``, ``reply``) with its ``extracted`` answer and ``correct`` (a reply
    with no answer in it is wrong, and counted as unparsed)."""
    scored = []
    for row in replies:
        extracted = extract_answer(row.get("reply"), rule)
        correct = extracted is not None and same_answer(extracted, reference_answer(row["reference"]))
        scored.append({**row, "extracted": extracted, "correct": correct})
    return scored


def accuracy(scored: list[dict[str, Any]], samples: int = 2000, confidence: float = 0.95) -> dict[str, Any]:
    """``{"accuracy", "interval", "n", "unparsed"}`` of one model's scored replies."""
    hits = [1.0 if row["correct"] else 0.0 for row in scored]
    if not hits:
        return {"accuracy": None, "interval": None, "n": 0, "unparsed": 0}
    return {"accuracy": sum(hits) / len(hits), "interval": list(bootstrap_interval(hits, samples, confidence)),
            "n": len(hits), "unparsed": sum(1 for row in scored if row["extracted"] is None)}


def paired_difference(better: list[dict[str, Any]], worse: list[dict[str, Any]], samples: int = 2000,
                      confidence: float = 0.95) -> dict[str, Any]:
    """Accuracy of ``better`` minus ``worse`` on the questions both answered, with the paired bootstrap interval
    (questions resampled, both models' answers to a question kept together)."""
    by_question = {row["question_id"]: row["correct"] for row in worse}
    differences = [float(row["correct"]) - float(by_question[row["question_id"]])
                   for row in better if row["question_id"] in by_question]
    if not differences:
        return {"difference": None, "interval": None, "n": 0}
    return {"difference": sum(differences) / len(differences),
            "interval": list(bootstrap_interval(differences, samples, confidence)), "n": len(differences)}
