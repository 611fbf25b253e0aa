"""Reading text that came from outside: a judge's answer (an OpenAI-compatible endpoint's or a vLLM engine's) and
anything else a stage writes. Nothing here raises on any ``str``; hostile text is simply no answer.

- ``read_json``: the JSON value a text is, or ``NOT_JSON`` (also for JSON nested too deep for Python's parser).
  Numbers are bounded: a literal of more than ``MAX_DIGITS`` digits is read as ``Oversized``, which is no number,
  instead of making ``int()`` raise (Python refuses integers of more than 4300 digits) or an ``inf``.
- ``rating``: a rating as a number, from a JSON value or from text: an integer, a finite float, or a string holding
  a plain decimal number (``"7"``, ``" 8.5 "``; ASCII digits only, bounded). Anything else is None.
- ``json_field``: one key of the JSON object a text is, else None.
- ``clean_text`` / ``clean_value``: text made valid UTF-8 for Arrow and Parquet (lone surrogates, which Python
  strings can hold and UTF-8 cannot, become U+FFFD; a surrogate pair becomes the character it encodes), with the
  number of characters repaired. NUL is valid UTF-8 and kept.

``feedback/judge.py`` (the rubric) and ``evaluate/prompts.py`` (ratings and verdicts) parse their judges' answers with these;
``data.py``'s writer repairs text with ``clean_value``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DIGITS = 15  # digits of a number worth reading (a rating has one or two; a float holds about 15 exactly)
_SURROGATE = re.compile("[\ud800-\udfff]")
_DECIMAL = re.compile(r"\s*([0-9]{1,%d})(?:\.([0-9]{1,%d}))?\s*" % (MAX_DIGITS, MAX_DIGITS))


class _NotJson:
    def __repr__(self) -> str:
        return "NOT_JSON"


NOT_JSON: Any = _NotJson()


class Oversized:
    """A JSON number literal too long to be any rating (its digits are not kept)."""

    def __init__(self, literal: str) -> None:
        self.chars = len(literal)

    def __repr__(self) -> str:
        return f"<a number of {self.chars} characters>"


def _bounded_int(literal: str) -> int | Oversized:
    return int(literal) if len(literal.lstrip("-")) <= MAX_DIGITS else Oversized(literal)


def _bounded_float(literal: str) -> float | Oversized:
    return float(literal) if len(literal) <= 2 * MAX_DIGITS + 8 else Oversized(literal)


def read_json(text: Any) -> Any:
    """The JSON value ``text`` is, or ``NOT_JSON``: for text that is not JSON, is not a ``str``, or is nested too deep."""
    if not isinstance(text, str):
        return NOT_JSON
    try:
        return json.loads(text, parse_int=_bounded_int, parse_float=_bounded_float)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return NOT_JSON


def json_kind(value: Any) -> str:
    """How a JSON value is called in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float, Oversized)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def json_field(text: Any, key: str) -> Any:
    """``key`` of the JSON object that ``text`` is (a JSON-schema endpoint's answer), else None: any other text,
    however hostile (nested too deep, a 5000-digit number), is simply not one."""
    data = read_json(text)
    return data.get(key) if isinstance(data, dict) else None


def rating(value: Any, whole: bool = False) -> float | None:
    """``value`` as a rating, or None when it is none: an int or a float below 10**MAX_DIGITS, or a plain decimal
    number written as a string (ASCII digits, at most ``MAX_DIGITS`` before and after the point). ``whole``:
    integers only (7, 7.0, "7"). Booleans, oversized numbers, NaN and infinities are no rating."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = float(value) if abs(value) < 10**MAX_DIGITS else math.nan  # float() of a huge int raises
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str):
        found = _DECIMAL.fullmatch(value)
        if found is None:
            return None
        number = float(found.group(0))
    else:
        return None
    if not math.isfinite(number) or abs(number) >= 10**MAX_DIGITS or (whole and not number.is_integer()):
        return None
    return number


def clean_text(text: str) -> tuple[str, int]:
    """``text`` as valid UTF-8 text, and how many characters were repaired (surrogates, the only code points a
    Python string can hold that UTF-8 cannot): each lone surrogate becomes U+FFFD, a surrogate pair (two characters
    in Python) the one character it encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return fixed, len(_SURROGATE.findall(text))
    return text, 0


def clean_value(value: Any) -> tuple[Any, int]:
    """``value`` with every string in it (dict keys, list items, nested) made valid UTF-8, and the number of
    characters repaired."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        out, replaced = {}, 0
        for key, item in value.items():
            key, n_key = clean_value(key)
            out[key], n_item = clean_value(item)
            replaced += n_key + n_item
        return out, replaced
    if isinstance(value, (list, tuple)):
        items, replaced = [], 0
        for item in value:
            item, n = clean_value(item)
            items.append(item)
            replaced += n
        return (items if isinstance(value, list) else tuple(items)), replaced
    return value, 0
