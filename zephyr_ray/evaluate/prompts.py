"""The project's own judge prompts for evaluation (the default; FastChat's are ``fastchat_prompts``), and what is read
back from any judge's answer: the ``[[rating]]`` and the ``[[A]]``/``[[B]]``/``[[C]]`` verdict, with the structured
output that holds a constrained judge to them."""

from __future__ import annotations

import re
from typing import Any

from ..untrusted import json_field, rating

PROMPT_VERSION = "zephyr-ray-eval-v1"

JUDGE_SYSTEM = "You are an impartial expert who judges the answers of AI assistants."

GRADE_PROMPT = """Judge how good the AI assistant's answer to the user's question below is. Weigh helpfulness,
relevance, accuracy, depth and detail; be objective.{reference_note} First explain your judgment in a few sentences,
then rate the answer on a scale of 1 to 10, written exactly like this: "Rating: [[5]]".
{reference}
[Question]
{question}

[The assistant's answer]
{answer}"""

GRADE_LATER_TURN_PROMPT = """Below is a conversation between a user and an AI assistant. Judge how good the
assistant's answer to the user's LAST question is, given the conversation before it. Weigh helpfulness, relevance,
accuracy, depth and detail; be objective.{reference_note} First explain your judgment in a few sentences, then rate
that last answer on a scale of 1 to 10, written exactly like this: "Rating: [[5]]".
{reference}
{conversation}"""

REFERENCE_NOTE = " A reference answer is given: compare the assistant's answer with it and count every mistake."

PAIRWISE_PROMPT = """Two AI assistants answered the user's question below. Decide which answer is better, weighing
helpfulness, relevance, accuracy, depth and detail. Do not let the order of the answers or their length sway you.
First compare the two answers in a few sentences, then give your verdict written exactly like this: "[[A]]" if
assistant A's answer is better, "[[B]]" if assistant B's answer is better, "[[C]]" for a tie.

[Question]
{question}

[Assistant A's answer]
{answer_a}

[Assistant B's answer]
{answer_b}"""

RATING = re.compile(r"\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]\]")

RATING_BACKUP = re.compile(r"\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]")  # FastChat accepts a single bracket too

VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")

VERDICT_WINNER = {"A": "first", "B": "second", "C": "tie"}

# How FastChat's gen_judgment.py reads an answer to its own prompts (fastchat/llm_judge/common.py): the first [[n]],
# else the first [n], is the rating; a pair's verdict is A if "[[A]]" is anywhere in it, else B, else C (a tie)
# (FastChat's \d+\.?\d* written so that no two parts can take the same digits: the same matches, in linear time on
# an endpoint's run of 100,000 digits, where FastChat's form backtracks quadratically)
FASTCHAT_RATING = re.compile(r"\[\[(\d+(?:\.\d*)?)\]\]")

FASTCHAT_RATING_BACKUP = re.compile(r"\[(\d+(?:\.\d*)?)\]")

# Tokens the constrained judge keeps for its rating line ("\n\nRating: [[10]]" and the stop) after the explanation.
RATING_LINE_TOKENS = 16



def turn_references(question: dict[str, Any], turn: int) -> list[str] | None:
    """The reference answers of turns 1..``turn`` when the question has every one of them, else None."""
    reference = question.get("reference") or []
    return list(reference[:turn]) if len(reference) >= turn and all(reference[:turn]) else None



def grade_prompt(question: dict[str, Any], answers: list[str], turn: int, use_reference: bool) -> str:
    """The judge's prompt for one turn: the question (or the conversation up to ``turn``) and the answer, with the
    reference answers up to that turn when ``use_reference`` and the question has them all."""
    reference = turn_references(question, turn) if use_reference else None
    if turn == 1:
        block = f"\n[Reference answer]\n{reference[0]}\n" if reference else ""
        return GRADE_PROMPT.format(reference_note=REFERENCE_NOTE if reference else "", reference=block,
                                   question=question["turns"][0], answer=answers[0])
    lines = []
    for i in range(turn):
        lines += [f"[User, turn {i + 1}]\n{question['turns'][i]}", f"[Assistant, turn {i + 1}]\n{answers[i]}"]
    block = ""
    if reference:
        block = "\n" + "\n".join(f"[Reference answer, turn {i + 1}]\n{reference[i]}" for i in range(turn)) + "\n"
    return GRADE_LATER_TURN_PROMPT.format(reference_note=REFERENCE_NOTE if block else "", reference=block,
                                          conversation="\n\n".join(lines))



def _preview(value: Any) -> str:
    return repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."


def _ratings(pattern: re.Pattern, text: str) -> set[float]:
    return {value for found in pattern.findall(text) if (value := rating(found)) is not None}



def parse_rating(text: str, as_fastchat: bool = False) -> tuple[float | None, str | None]:
    """The judge's ``[[n]]`` rating (1-10): (rating, None) or (None, why not). Any text gives one or the other
    (``untrusted``: a number of more digits than any rating, or JSON nested too deep, is no rating). Several
    different ratings are no rating, unless ``as_fastchat`` (an answer to FastChat's prompts): then the first one
    counts, as FastChat's MT-Bench scores were read."""
    # a JSON-schema answer is read by its field alone: its explanation may quote brackets ("returns [3] instead of
    # [1, 2, 3]"), which the [[n]] / [n] search would take for the rating
    answered = json_field(text, "rating")
    if answered is not None:
        value = rating(answered)
        found = {value} if value is not None else set()
        if not found:
            return None, f"the judge's JSON rating {_preview(answered)} is no rating"
    elif as_fastchat:
        first = FASTCHAT_RATING.search(text) or FASTCHAT_RATING_BACKUP.search(text)
        value = rating(first.group(1).rstrip(".")) if first else None  # "8." is 8 to FastChat's literal_eval
        found = {value} if value is not None else set()
    else:
        found = _ratings(RATING, text) or _ratings(RATING_BACKUP, text)
    if not found:
        return None, "no [[rating]] in the judge's answer"
    if len(found) > 1:
        return None, f"several different ratings in the judge's answer: {sorted(found)}"
    value = found.pop()
    if not 1 <= value <= 10:
        return None, f"rating {value:g} is outside 1-10"
    return value, None



def parse_verdict(text: str, as_fastchat: bool = False) -> tuple[str | None, str | None]:
    """'first', 'second' or 'tie' from ``[[A]]``, ``[[B]]``, ``[[C]]``: (verdict, None) or (None, why not).
    Several different verdicts are none, unless ``as_fastchat``: then [[A]] wins over [[B]] over [[C]], as in
    FastChat's reading of its pairwise prompts."""
    answered = json_field(text, "verdict")  # a JSON-schema answer: its field alone (as for ratings)
    if answered is not None:
        if not (isinstance(answered, str) and answered in VERDICT_WINNER):
            return None, f"the judge's JSON verdict {_preview(answered)} is not A, B or C"
        found = {answered}
    elif as_fastchat:
        found = next(({letter} for letter in VERDICT_WINNER if f"[[{letter}]]" in text), set())
    else:
        found = set(VERDICT.findall(text))
    if not found:
        return None, "no [[A]], [[B]] or [[C]] verdict in the judge's answer"
    if len(found) > 1:
        return None, f"several different verdicts in the judge's answer: {sorted(found)}"
    return VERDICT_WINNER[found.pop()], None



def explanation_chars(max_tokens: int) -> int:
    """How long the constrained judge's explanation may be so that its rating line still fits in ``max_tokens``:
    a token is at least one character, and a character may take two tokens in a byte-level vocabulary."""
    return max(8, (max_tokens - RATING_LINE_TOKENS) // 2)



def output_regex(kind: str, max_tokens: int) -> str:
    """vLLM structured output for a judge: an explanation (no brackets, no newline), then the rating/verdict."""
    tail = r"Rating: \[\[(10|[1-9])\]\]" if kind == "grade" else r"Verdict: \[\[[ABC]\]\]"
    return r"[^\[\]\n]{1," + str(explanation_chars(max_tokens)) + r"}\n\n" + tail



def output_schema(kind: str) -> dict[str, Any]:
    """The same for endpoints that take a JSON schema (``response_format``)."""
    value = ({"type": "integer", "minimum": 1, "maximum": 10} if kind == "grade"
             else {"type": "string", "enum": list(VERDICT_WINNER)})
    field = "rating" if kind == "grade" else "verdict"
    return {"type": "object", "properties": {"explanation": {"type": "string"}, field: value},
            "required": ["explanation", field], "additionalProperties": False}
