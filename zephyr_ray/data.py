"""Dataset contracts, readers, validation with rejects, and atomic Parquet writers.

Rows travel between stages as Parquet in the schemas the community already uses (``ultrachat_200k`` for dialogues,
``ultrafeedback_binarized`` for preferences), so every output loads with ``datasets`` and drops into TRL.

Reading keeps every input row as raw JSON text with its origin (file and row number) until validation, so a row
of the wrong type, a line that is not JSON or not UTF-8 never breaks the read: it becomes a reject with a reason.
Counts always add up: rows in = accepted + rejected.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import os
import re
import shutil
import types
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .console import expecting_rows

logger = logging.getLogger(__name__)

SUCCESS_MARKER = "_SUCCESS"
DEFAULT_MAX_CHARS = 100_000
RAW_PREVIEW_CHARS = 2_000
HUB_BLOCK_ROWS = 10_000
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def prompt_id_of(prompt: str) -> str:
    """The ``prompt_id`` of ``ultrachat_200k`` / ``ultrafeedback_binarized``: sha256 of the prompt text."""
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()  # bad text is caught by the contract


# ---------------------------------------------------------------------------------------------------------------
# Contracts
# ---------------------------------------------------------------------------------------------------------------


def text_problem(value: str, what: str, max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """Why ``value`` cannot be a message's text (None when it can): the rule every contract applies."""
    try:
        _check_text(value, what, max_chars)
    except ValueError as err:
        return str(err)
    return None


def _check_text(value: str, what: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    if not value.strip():
        raise ValueError(f"{what} is empty")
    if len(value) > max_chars:
        raise ValueError(f"{what} has {len(value)} characters, over the limit of {max_chars}")
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (lone surrogate)") from None
    return value


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content(cls, value: str) -> str:
        return _check_text(value, "content")


def _check_conversation(messages: list[Message], what: str, ends_with_assistant: bool) -> None:
    """Zephyr's shape: an optional leading system message, then user and assistant turns alternating."""
    turns = messages[1:] if messages and messages[0].role == "system" else messages
    if not turns:
        raise ValueError(f"{what} has no user or assistant turn")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            position = i + (len(messages) - len(turns))
            raise ValueError(f"{what}[{position}] has role '{message.role}', expected '{expected}'")
    if ends_with_assistant and turns[-1].role != "assistant":
        raise ValueError(f"{what} must end with an assistant turn")


class Row(BaseModel):
    """A row contract. ``derived`` fields may be absent in the input and are filled in by ``_derive``."""

    model_config = ConfigDict(extra="ignore", strict=True)
    derived: ClassVar[tuple[str, ...]] = ()
    unique_key: ClassVar[str | None] = None  # a second row with the same value is rejected as a duplicate

    @classmethod
    def arrow_schema(cls) -> pa.Schema:
        return pa.schema([pa.field(name, _arrow_type(info.annotation)) for name, info in cls.model_fields.items()])


def _with_prompt_id(row: Any) -> Any:
    if isinstance(row, dict) and "prompt_id" not in row and isinstance(row.get("prompt"), str):
        return {**row, "prompt_id": prompt_id_of(row["prompt"])}
    return row


class PromptRow(Row):
    """A prompt for synthesis, completion or evaluation: ``prompt`` text (``prompt_id`` derived when missing)."""

    derived: ClassVar[tuple[str, ...]] = ("prompt_id",)
    unique_key: ClassVar[str | None] = "prompt_id"
    prompt: str
    prompt_id: str

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, row: Any) -> Any:
        return _with_prompt_id(row)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return _check_text(value, "prompt")


class DialogueRow(PromptRow):
    """One dSFT dialogue, as in ``HuggingFaceH4/ultrachat_200k`` (``prompt`` = the first user turn when missing)."""

    derived: ClassVar[tuple[str, ...]] = ("prompt", "prompt_id")
    unique_key: ClassVar[str | None] = None  # several dialogues may start from one prompt
    messages: list[Message]

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, row: Any) -> Any:
        if isinstance(row, dict) and "prompt" not in row and isinstance(row.get("messages"), list):
            first_user = next((m.get("content") for m in row["messages"]
                               if isinstance(m, dict) and m.get("role") == "user"), None)
            if isinstance(first_user, str):
                row = {**row, "prompt": first_user}
        return _with_prompt_id(row)

    @field_validator("messages")
    @classmethod
    def _messages(cls, messages: list[Message]) -> list[Message]:
        _check_conversation(messages, "messages", ends_with_assistant=True)
        return messages


class CompletionRow(Row):
    """One completion of one prompt by one pool model, with its lineage."""

    prompt: str
    prompt_id: str
    model: str
    messages: list[Message]
    completion: str
    sampling_params: str  # JSON: exactly what vLLM was given
    principle: str | None = None
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: str  # stop | length | error
    generation_error: str | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, messages: list[Message]) -> list[Message]:
        _check_conversation(messages, "messages", ends_with_assistant=False)
        return messages


class JudgmentRow(CompletionRow):
    """A completion with the judge's scores; a judgment that failed keeps ``judge_error`` instead of scores."""

    judge: str
    instruction_following: float | None = None
    honesty: float | None = None
    truthfulness: float | None = None
    helpfulness: float | None = None
    overall: float | None = None
    rationale: str | None = None
    raw_judgment: str | None = None
    judge_error: str | None = None


class PreferenceRow(PromptRow):
    """A preference triple, as in ``HuggingFaceH4/ultrafeedback_binarized`` (plus lineage)."""

    derived: ClassVar[tuple[str, ...]] = ("prompt_id", "messages")
    unique_key: ClassVar[str | None] = None
    chosen: list[Message]
    rejected: list[Message]
    messages: list[Message]
    score_chosen: float
    score_rejected: float
    # lineage, filled in by our binarize stage; absent from other preference sets
    chosen_model: str | None = None
    rejected_model: str | None = None
    judge: str | None = None
    num_scored: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, row: Any) -> Any:
        row = _with_prompt_id(row)
        if isinstance(row, dict):
            if "messages" not in row and "chosen" in row:
                row = {**row, "messages": row["chosen"]}
            for key in ("score_chosen", "score_rejected"):
                if isinstance(row.get(key), int) and not isinstance(row.get(key), bool):
                    row = {**row, key: float(row[key])}
        return row

    @field_validator("chosen", "rejected")
    @classmethod
    def _conversation(cls, messages: list[Message], info: Any) -> list[Message]:
        _check_conversation(messages, info.field_name, ends_with_assistant=True)
        return messages

    @field_validator("score_chosen", "score_rejected")
    @classmethod
    def _finite(cls, value: float, info: Any) -> float:
        if not math.isfinite(value):
            raise ValueError(f"{info.field_name} is not a finite number")
        return value

    @model_validator(mode="after")
    def _same_prompt(self) -> PreferenceRow:
        if self.chosen[:-1] != self.rejected[:-1]:
            raise ValueError("chosen and rejected must share the same prompt turns")
        return self


def _question_id(value: Any) -> Any:
    """MT-Bench ids are integers; ours are text, so ids of any set fit one column."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class QuestionRow(Row):
    """An MT-Bench question, as in FastChat's ``question.jsonl`` (``question_id``, ``category``, ``turns``, optional
    ``reference``); ``HuggingFaceH4/mt_bench_prompts``' columns (``prompt_id``, ``prompt``) are read the same way."""

    derived: ClassVar[tuple[str, ...]] = ("question_id",)
    unique_key: ClassVar[str | None] = "question_id"
    question_id: str
    category: str
    turns: list[str]
    # one per turn; None for a turn without one (FastChat's own file has "" there, e.g. question 142: ["...", ""])
    reference: list[str | None] | None = None

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, row: Any) -> Any:
        if not isinstance(row, dict):
            return row
        row = dict(row)
        if "turns" not in row and isinstance(row.get("prompt"), list):
            row["turns"] = row.pop("prompt")
        if "question_id" not in row and "prompt_id" in row:
            row["question_id"] = row.pop("prompt_id")
        if "question_id" in row:  # else a missing field, reported as one
            row["question_id"] = _question_id(row["question_id"])
        if row.get("reference") == []:  # the hub copy gives every question a reference list, empty when none
            row["reference"] = None
        return row

    @field_validator("question_id", "category")
    @classmethod
    def _name(cls, value: str, info: Any) -> str:
        return _check_text(value, info.field_name, max_chars=200).strip()

    @field_validator("turns")
    @classmethod
    def _turns(cls, turns: list[str]) -> list[str]:
        if not turns:
            raise ValueError("turns is empty")
        return [_check_text(turn, f"turns[{i}]") for i, turn in enumerate(turns)]

    @field_validator("reference")
    @classmethod
    def _reference(cls, reference: list[str | None] | None) -> list[str | None] | None:
        """An empty or missing reference of a turn is no reference for that turn, not a broken question."""
        if reference is None:
            return None
        kept = [None if r is None or not r.strip() else _check_text(r, f"reference[{i}]")
                for i, r in enumerate(reference)]
        return kept if any(r is not None for r in kept) else None


class ReferenceAnswerRow(Row):
    """A reference answer in FastChat's answer format (``question_id``, ``choices: [{turns: [...]}]``); ``turns``
    is taken from the first choice."""

    unique_key: ClassVar[str | None] = "question_id"
    question_id: str
    turns: list[str]

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, row: Any) -> Any:
        if isinstance(row, dict):
            row = {**row, "question_id": _question_id(row.get("question_id"))}
            choices = row.get("choices")
            if "turns" not in row and isinstance(choices, list) and choices and isinstance(choices[0], dict):
                row["turns"] = choices[0].get("turns")
        return row

    @field_validator("turns")
    @classmethod
    def _turns(cls, turns: list[str]) -> list[str]:
        if not turns:
            raise ValueError("turns is empty")
        return [_check_text(turn, f"turns[{i}]") for i, turn in enumerate(turns)]


class ReferenceQuestionRow(Row):
    """A question with a reference answer (exact-match evaluation): GSM8K's ``question`` / ``answer`` as they are
    (worked solution, then ``#### <answer>``) or a plain answer; ``question_id`` is the sha256 of the question."""

    derived: ClassVar[tuple[str, ...]] = ("question_id",)
    unique_key: ClassVar[str | None] = "question_id"
    question: str
    answer: str
    question_id: str

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, row: Any) -> Any:
        if isinstance(row, dict):
            answer = row.get("answer")
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):  # a plain numeric answer column
                row = {**row, "answer": str(answer)}
            if "question_id" not in row and isinstance(row.get("question"), str):
                row = {**row, "question_id": prompt_id_of(row["question"])}
        return row

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        return _check_text(value, "question")

    @field_validator("answer")
    @classmethod
    def _answer(cls, value: str) -> str:
        from .evaluate.exact_match import reference_answer

        value = _check_text(value, "answer")
        if not reference_answer(value):
            raise ValueError("answer: nothing after its '####' marker")
        return value


class InstructionRow(Row):
    """A pairwise-evaluation instruction, as in AlpacaEval's JSON (``instruction``, and a reference set's
    ``output``, ``generator``, ``dataset``); ``instruction_id`` is the sha256 of the instruction. Arena-Hard-Auto's
    question.jsonl reads as it is: v2.0's ``uid``, ``category``, ``prompt``; v0.1's ``question_id``, ``category``,
    ``turns: [{"content": ...}]`` (the first turn); their id is kept and their category is the ``dataset``."""

    derived: ClassVar[tuple[str, ...]] = ("instruction_id",)
    unique_key: ClassVar[str | None] = "instruction_id"
    instruction: str
    instruction_id: str
    output: str | None = None
    generator: str | None = None
    dataset: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, row: Any) -> Any:
        if isinstance(row, dict):
            if "instruction" not in row and isinstance(row.get("prompt"), str):
                row = {**row, "instruction": row["prompt"]}
            turns = row.get("turns")
            if "instruction" not in row and isinstance(turns, list) and turns:
                first = turns[0]
                row = {**row, "instruction": first.get("content") if isinstance(first, dict) else first}
            given_id = row.get("uid", row.get("question_id"))
            if "instruction_id" not in row and isinstance(given_id, (str, int)) and not isinstance(given_id, bool):
                row = {**row, "instruction_id": str(given_id)}
            if "dataset" not in row and isinstance(row.get("category"), str):
                row = {**row, "dataset": row["category"]}
            if "instruction_id" not in row and isinstance(row.get("instruction"), str):
                row = {**row, "instruction_id": prompt_id_of(row["instruction"])}
        return row

    @field_validator("instruction")
    @classmethod
    def _instruction(cls, value: str) -> str:
        return _check_text(value, "instruction")

    @field_validator("output")
    @classmethod
    def _output(cls, value: str | None) -> str | None:
        return None if value is None else _check_text(value, "output")


CONTRACTS: dict[str, type[Row]] = {
    "prompt": PromptRow,
    "dialogue": DialogueRow,
    "completion": CompletionRow,
    "judgment": JudgmentRow,
    "preference": PreferenceRow,
    "question": QuestionRow,
    "reference_answer": ReferenceAnswerRow,
    "instruction": InstructionRow,
}


def _arrow_type(annotation: Any) -> pa.DataType:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return _arrow_type(inner)
    if origin is list:
        return pa.list_(_arrow_type(get_args(annotation)[0]))
    if origin is Literal:
        return pa.string()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct([pa.field(n, _arrow_type(f.annotation)) for n, f in annotation.model_fields.items()])
    return {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}[annotation]


REJECT_SCHEMA = pa.schema(
    [("source", pa.string()), ("row", pa.int64()), ("field", pa.string()), ("reason", pa.string()),
     ("raw", pa.string())]
)


def check_row(raw: str | None, decode_error: str | None, contract: type[Row]) -> tuple[dict | None, dict | None]:
    """Validate one raw row: (accepted row, None) or (None, reject with field and reason)."""
    if decode_error is not None:
        return None, {"field": None, "reason": decode_error}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        return None, {"field": None, "reason": f"not valid JSON: {err.msg} at column {err.colno}"}
    except RecursionError:
        return None, {"field": None, "reason": "not valid JSON: nested too deeply"}
    except ValueError as err:  # an integer of more than 4300 digits
        return None, {"field": None, "reason": f"not valid JSON: {err}"}
    if not isinstance(data, dict):
        return None, {"field": None, "reason": f"a row must be a JSON object, got {type(data).__name__}"}
    try:
        return contract.model_validate(data).model_dump(), None
    except ValidationError as err:
        errors = err.errors()
        # a derived field (prompt, prompt_id) is missing or bad because an input field is: report the input field
        errors = [e for e in errors if not (e["type"] == "missing" and e["loc"][0] in contract.derived)] or errors
        errors.sort(key=lambda e: bool(e["loc"]) and e["loc"][0] in contract.derived)  # input fields first
        first = errors[0]
        loc = ".".join(str(p) for p in first["loc"])
        reason = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            reason = "missing field"
        elif first["type"] not in ("value_error",) and not isinstance(first.get("input"), (dict, list)):
            reason += f" (got {_preview(first.get('input'), 80)})"
        more = len(errors) - 1
        return None, {"field": loc or None, "reason": reason + (f" (+{more} more problems)" if more else "")}


def _preview(value: Any, limit: int = RAW_PREVIEW_CHARS) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


# ---------------------------------------------------------------------------------------------------------------
# Readers: every source becomes rows of (_source, _row, _raw, _decode_error)
# ---------------------------------------------------------------------------------------------------------------

RAW_SCHEMA = pa.schema([("_source", pa.string()), ("_row", pa.int64()), ("_raw", pa.string()),
                        ("_decode_error", pa.string())])


def is_hub_id(path: str) -> bool:
    """``owner/name`` that is not a local path and not a data file: a dataset or model id on the Hugging Face hub."""
    return (
        not path.startswith((".", "/", "~"))
        and not Path(path).exists()
        and bool(_HUB_ID.match(path))
        and not path.endswith(DATA_SUFFIXES)
    )


def _local_files(path: Path) -> tuple[str, list[Path]]:
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ValueError(f"{path}: not a .jsonl, .json or .parquet file (convert it, e.g. with `datasets`)")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                       and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    kinds = {"parquet" if p.suffix == ".parquet" else "jsonl" for p in files}
    if not files:
        raise FileNotFoundError(f"{path}: no .jsonl, .json or .parquet files")
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes JSONL and Parquet files; point at one kind")
    return kinds.pop(), files


def _jsonl_rows(batch: dict[str, Any]) -> Any:
    """Split JSONL files into raw rows, line by line: a line that is not UTF-8 becomes a decode error, not a crash."""
    for file, data in zip(batch["path"], batch["bytes"]):
        yield _raw_table(file, _file_rows(file, data))


def _file_rows(file: str, data: bytes) -> list[tuple[int, str | None, str | None]]:
    """(row number, raw text, decode error) of one JSONL file, or of a ``.json`` file holding a JSON list."""
    data = data.removeprefix(codecs.BOM_UTF8)  # what Windows editors write first: not part of row 1
    if file.endswith(".json") and data.lstrip()[:1] == b"[":
        return _json_array_rows(data)
    rows = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, line.decode("utf-8"), None))
        except UnicodeDecodeError as err:
            rows.append((number, line.decode("utf-8", "backslashreplace"), f"not valid UTF-8 ({err.reason} at byte {err.start} of the line)"))
    return rows


def _json_array_rows(data: bytes) -> list[tuple[int, str | None, str | None]]:
    """A ``.json`` file holding one JSON list (AlpacaEval's format): its items are the rows, numbered from 1. A file
    that does not parse is one reject, with the reason."""
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        return [(1, None, f"not valid UTF-8 ({err.reason} at byte {err.start} of the file)")]
    except json.JSONDecodeError as err:
        reason = f"not a valid JSON list: {err.msg} at line {err.lineno} column {err.colno}"
        return [(1, _preview(data.decode("utf-8")), reason)]
    except (RecursionError, ValueError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        return [(1, _preview(data.decode("utf-8")), f"not a valid JSON list: {reason}")]
    if not isinstance(items, list):
        return [(1, _preview(data.decode("utf-8")), f"a JSON list was expected, got {type(items).__name__}")]
    return [(number, json.dumps(item, ensure_ascii=False), None) for number, item in enumerate(items, start=1)]


def _parquet_rows(batch: dict[str, Any]) -> Any:
    import pyarrow.parquet as pq

    for file in batch["path"]:
        number = 0
        for record_batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
            rows = []
            for row in record_batch.to_pylist():
                number += 1
                rows.append((number, json.dumps(row, default=_json_default, ensure_ascii=False), None))
            yield _raw_table(file, rows)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"__binary__": len(value)}  # binary where text belongs: the contract rejects it by field
    return str(value)


def _raw_table(source: str, rows: list[tuple[int, str | None, str | None]]) -> pa.Table:
    return pa.table(
        {"_source": [source] * len(rows), "_row": [r[0] for r in rows], "_raw": [r[1] for r in rows],
         "_decode_error": [r[2] for r in rows]},
        schema=RAW_SCHEMA,
    )


def read_raw(path: str, split: str = "train", name: str | None = None, limit: int | None = None) -> Any:
    """Read a hub dataset id, a local JSONL/Parquet file or a directory of them into a Ray dataset of raw rows."""
    import ray.data

    local = Path(path).expanduser()
    if is_hub_id(path) or _is_hub_layout(local):
        return _read_hub(path, split, name, limit)
    if not local.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    kind, files = _local_files(local)
    if kind == "jsonl":
        ds = ray.data.read_binary_files([str(f) for f in files], include_paths=True).map_batches(
            _jsonl_rows, batch_size=1, batch_format="numpy")
    else:
        ds = ray.data.from_items([{"path": str(f)} for f in files]).map_batches(
            _parquet_rows, batch_size=1, batch_format="numpy")
    return ds.limit(limit) if limit else ds


def local_row_count(path: str, split: str = "train") -> int | None:
    """Rows of a local dataset as ``read_raw`` reads it, counted without reading rows into Ray (a JSONL line, a JSON
    list's item, a Parquet row; a hub-layout copy's ``data/<split>-*.parquet``); None where that is not known
    without loading it (a hub-layout copy in another format)."""
    import pyarrow.parquet as pq

    local = Path(path).expanduser()
    if _is_hub_layout(local):
        files = sorted((local / "data").glob(f"{split}-*.parquet")) if (local / "data").is_dir() else []
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files) if files else None
    kind, files = _local_files(local)
    if kind == "parquet":
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return sum(len(_file_rows(str(file), file.read_bytes())) for file in files)


def _is_hub_layout(path: Path) -> bool:
    """A local copy of a hub dataset (``README.md`` with split config, or ``data/<split>-*.parquet``)."""
    return path.is_dir() and ((path / "data").is_dir() or (path / "README.md").is_file())


def _read_hub(path: str, split: str, name: str | None, limit: int | None) -> Any:
    """A dataset on the hub (or a local copy in the hub's layout) through ``datasets.load_dataset``."""
    import datasets
    import ray.data

    hf = datasets.load_dataset(path, name, split=f"{split}[:{limit}]" if limit else split)
    source = f"{path}:{split}"
    hf = hf.map(
        lambda row, index: {"_source": source, "_row": index + 1,
                            "_raw": json.dumps(dict(row), default=_json_default, ensure_ascii=False),
                            "_decode_error": None},
        with_indices=True, remove_columns=hf.column_names,
        features=datasets.Features.from_arrow_schema(RAW_SCHEMA),
    )
    # ``ray.data.from_huggingface`` first looks the dataset up on the hub (minutes of timeouts offline); the
    # loaded Arrow table is already here, so hand it over in blocks.
    table = hf.data.table
    return ray.data.from_arrow([table.slice(start, HUB_BLOCK_ROWS) for start in range(0, max(len(table), 1),
                                                                                      HUB_BLOCK_ROWS)])


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """What happened to the input: every row is either accepted or rejected with a reason."""

    source: str
    total: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    contaminated: int | None = None  # rows sharing an n-gram with an evaluation prompt (None: not screened)

    def as_dict(self) -> dict[str, Any]:
        counts = {"source": self.source, "total": self.total, "accepted": self.accepted, "rejected": self.rejected,
                  "reasons": dict(self.reasons.most_common())}
        if self.contaminated is not None:
            counts["contaminated"] = self.contaminated
        return counts


@dataclass
class Validated:
    accepted: Any  # ray.data.Dataset with the contract's columns
    rejected: Any  # ray.data.Dataset with REJECT_SCHEMA columns
    report: ValidationReport


def _checked_schema(contract: type[Row]) -> pa.Schema:
    return pa.schema(list(contract.arrow_schema()) + list(REJECT_SCHEMA) + [("contaminated_by", pa.string())])


def user_texts(row: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, text) of what a row asks: its prompt and every user turn of its conversations (a dialogue's later
    questions, a multi-turn preference pair's), which the decontamination screen reads."""
    texts = [("prompt", row["prompt"])] if row.get("prompt") else []
    for key in ("messages", "chosen", "rejected"):
        texts += [(f"{key}[{i}].content", m["content"]) for i, m in enumerate(row.get(key) or [])
                  if m.get("role") == "user" and m.get("content") != row.get("prompt")]
    return texts


def screened(screen: Any, row: dict[str, Any]) -> tuple[str, Any] | None:
    """The first (field, hit) of ``row``'s user texts on the evaluation prompts' n-grams; None when clean."""
    return next(((field, hit) for field, text in user_texts(row) if (hit := screen.match(text)) is not None), None)


def contaminating(hit: Any) -> str:
    """The evaluation prompt a screen ``hit`` names, and the words shared with it."""
    return f"evaluation prompt {hit.item}: '{hit.words}'"


def contamination_reason(hit: Any) -> str:
    """A contaminated row's reject reason (the same for read rows and synthesized dialogues)."""
    return f"contaminated: shares {len(hit.words.split())} words with {contaminating(hit)}"


def _check_batch(batch: pa.Table, contract: type[Row], screen: Any = None) -> pa.Table:
    out = []
    for row in batch.to_pylist():
        accepted, reject = check_row(row["_raw"], row["_decode_error"], contract)
        found = screened(screen, accepted) if screen is not None and accepted is not None else None
        contaminated_by = None if found is None else contaminating(found[1])
        if found is not None and screen.drop:
            accepted, reject = None, {"field": found[0], "reason": contamination_reason(found[1])}
        if accepted is not None:
            out.append({**accepted, "source": row["_source"], "row": row["_row"], "contaminated_by": contaminated_by})
        else:
            out.append({**reject, "source": row["_source"], "row": row["_row"], "contaminated_by": contaminated_by,
                        "raw": None if row["_raw"] is None else _preview(row["_raw"])})
    return pa.Table.from_pylist(out, schema=_checked_schema(contract))


def _mark_duplicates(group: pa.Table, key: str) -> pa.Table:
    """Within rows sharing ``key``, the first accepted row (by source and row number) stays; later ones are rejected."""
    rows = sorted(group.to_pylist(), key=lambda r: (r["source"], r["row"]))
    first = next((r for r in rows if r["reason"] is None), None)
    if first is not None and first[key] is not None:
        for row in rows:
            if row["reason"] is None and row is not first:
                row.update(reason=f"duplicate {key} (first at {first['source']} row {first['row']})", field=key,
                           raw=_preview(json.dumps({k: row[k] for k in group.column_names
                                                    if k not in REJECT_SCHEMA.names}, ensure_ascii=False)))
    return pa.Table.from_pylist(rows, schema=group.schema)


def count_values(ds: Any, column: str) -> Counter:
    """How often each value of ``column`` occurs in ``ds`` (None included), streamed batch by batch."""
    counts: Counter = Counter()
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow", batch_size=65536):
        counts.update(batch[column].to_pylist())
    return counts


def split_by_reason(checked: Any, kept_columns: list[str], rejected_columns: list[str]) -> tuple[Any, Any]:
    """Rows whose ``reason`` is null (kept) and those with a reason (rejected), from one materialized dataset."""
    import pyarrow.compute as pc

    kept = checked.map_batches(lambda t: t.filter(pc.is_null(t["reason"])).select(kept_columns),
                               batch_format="pyarrow")
    rejected = checked.map_batches(lambda t: t.filter(pc.is_valid(t["reason"])).select(rejected_columns),
                                   batch_format="pyarrow")
    return kept, rejected


def validate(raw: Any, contract: type[Row], source: str, screen: Any = None) -> Validated:
    """Check raw rows against a contract; accepted and rejected rows come back as two Ray datasets plus counts.

    With a ``screen`` (``decontaminate.Screen``), prompts that overlap evaluation prompts are counted, and rejected
    when the screen drops them."""
    checked = raw.map_batches(_check_batch, fn_kwargs={"contract": contract, "screen": screen},
                              batch_format="pyarrow")
    if contract.unique_key:
        checked = checked.groupby(contract.unique_key).map_groups(
            _mark_duplicates, fn_kwargs={"key": contract.unique_key}, batch_format="pyarrow")
    checked = checked.materialize()
    accepted, rejected = split_by_reason(checked, contract.arrow_schema().names, REJECT_SCHEMA.names)
    reasons = count_values(checked, "reason")
    accepted_rows = reasons.pop(None, 0)
    report = ValidationReport(source=source, total=accepted_rows + sum(reasons.values()), accepted=accepted_rows,
                              rejected=sum(reasons.values()), reasons=reasons)
    if screen is not None:
        report.contaminated = sum(n for by, n in count_values(checked, "contaminated_by").items() if by is not None)
    logger.info("%s: %d rows, %d accepted, %d rejected", source, report.total, report.accepted, report.rejected)
    return Validated(accepted, rejected, report)


def load(path: str, contract: type[Row] | str, split: str = "train", name: str | None = None,
         limit: int | None = None, screen: Any = None) -> Validated:
    """Read ``path`` (hub id, JSONL, Parquet) and validate it against ``contract``."""
    contract = CONTRACTS[contract] if isinstance(contract, str) else contract
    return validate(read_raw(path, split=split, name=name, limit=limit), contract, source=path, screen=screen)


# ---------------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------------


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``path`` whole or not at all (a temporary file beside it, renamed): a reader never sees half a file,
    and writers in two processes do not share the temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def read_rows(out_dir: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """A small stage output (or its first ``limit`` rows) as dicts, on the driver: evaluation sets, reports."""
    import pyarrow.dataset as pads

    dataset = pads.dataset(str(out_dir), format="parquet")
    return (dataset.head(limit) if limit is not None else dataset.to_table()).to_pylist()


def is_complete(out_dir: str | Path) -> bool:
    """True when ``out_dir`` was written to the end by ``write_parquet_atomic`` (a re-run can skip it)."""
    return (Path(out_dir) / SUCCESS_MARKER).is_file()


PICKLED_OBJECTS = "ray.data.arrow_pickled_object"  # Ray Data's column type for values Arrow cannot hold
TEXT_REPAIRS = "_text_repairs"


def _holds_objects(column: Any) -> bool:
    return isinstance(column.type, pa.ExtensionType) and column.type.extension_name == PICKLED_OBJECTS


def conform(table: pa.Table, schema: pa.Schema | None = None, repairs_dir: str | None = None) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in order and type (missing columns become nulls), or with its own
    columns when no schema is given; every string in it valid UTF-8.

    Arrow strings are UTF-8, so text that is not (a lone surrogate from an endpoint's JSON) cannot become an Arrow
    string: Ray Data keeps such a column as pickled Python objects. Here those values are repaired (``untrusted.
    clean_value``: U+FFFD for each lone surrogate) and typed; with ``repairs_dir``, a batch that needed repairs
    leaves a note there (rows, characters, columns) that ``write_parquet_atomic`` adds up."""
    if schema is None and not any(_holds_objects(column) for column in table.columns):
        return table
    names = schema.names if schema is not None else table.column_names
    columns, fields = [], []
    repaired_rows, characters, repaired_columns = [False] * len(table), 0, []
    for name in names:
        target = schema.field(name).type if schema is not None else None
        if name not in table.column_names:
            column = pa.nulls(len(table), target)
        elif _holds_objects(table[name]):
            values, replaced = _clean_values(table[name].to_pylist(), repaired_rows)
            if replaced:
                characters += replaced
                repaired_columns.append(name)
            column = pa.array(values, type=target)
        else:
            column = table[name] if target is None else table[name].cast(target)
        columns.append(column)
        fields.append(schema.field(name) if schema is not None else pa.field(name, column.type))
    out = pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=(schema or table.schema).metadata))
    if characters and repairs_dir is not None:
        _note_repairs(out, Path(repairs_dir), sum(repaired_rows), characters, repaired_columns)
    return out


def _clean_values(values: list[Any], repaired_rows: list[bool]) -> tuple[list[Any], int]:
    """One column's values with every string valid UTF-8 (``untrusted.clean_value``), and the characters replaced;
    marks the rows it repaired in ``repaired_rows``."""
    from .untrusted import clean_value

    cleaned, replaced = [], 0
    for i, value in enumerate(values):
        value, n = clean_value(value)
        cleaned.append(value)
        if n:
            repaired_rows[i], replaced = True, replaced + n
    return cleaned, replaced


def _note_repairs(table: pa.Table, repairs_dir: Path, rows: int, characters: int, columns: list[str]) -> None:
    """One note per repaired batch, named by the batch's content: a retried task rewrites its own note (and two
    batches of identical rows count once)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    name = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:32]
    repairs_dir.mkdir(parents=True, exist_ok=True)
    note = repairs_dir / f"{name}.json"
    note.with_suffix(".tmp").write_text(json.dumps({"rows": rows, "characters": characters, "columns": columns}))
    note.with_suffix(".tmp").replace(note)


def _sum_repairs(repairs_dir: Path) -> dict[str, Any] | None:
    notes = [json.loads(p.read_text()) for p in sorted(repairs_dir.glob("*.json"))] if repairs_dir.is_dir() else []
    if not notes:
        return None
    return {"rows": sum(n["rows"] for n in notes), "characters": sum(n["characters"] for n in notes),
            "columns": sorted({c for n in notes for c in n["columns"]})}


def text_repairs(out_dir: str | Path) -> dict[str, Any] | None:
    """What ``write_parquet_atomic`` repaired in an output's text (rows, characters replaced, columns), or None."""
    marker = Path(out_dir) / SUCCESS_MARKER
    return json.loads(marker.read_text()).get("text_repaired") if marker.is_file() else None


def written_rows(*out_dirs: str | Path) -> int:
    """Rows of finished ``write_parquet_atomic`` outputs, from their ``_SUCCESS`` markers (no data read)."""
    return sum(json.loads((Path(d) / SUCCESS_MARKER).read_text())["rows"] for d in out_dirs)


def write_parquet_atomic(ds: Any, out_dir: str | Path, schema: pa.Schema | None = None,
                         expected_rows: int | None = None) -> int:
    """Write a Ray dataset as a Parquet directory: into a temporary sibling, then renamed into place.

    A crash leaves at most a ``.tmp-*`` directory that the next run clears, never a half-written output. The
    ``_SUCCESS`` marker holds the row count. An empty dataset still yields one Parquet file with ``schema``,
    so the next stage reads zero rows rather than failing to find files. ``expected_rows`` (when the caller knows
    it) is the total of the progress line while the write runs. Text is valid UTF-8 before it is written
    (``conform``): rows whose text had to be repaired are counted in the marker (``text_repaired``: rows,
    characters, columns; see ``text_repairs``) and logged, never a crashed write.
    """
    return write_parquet_atomic_many([(ds, out_dir)], schema, expected_rows)[0]


_PART = "__zr_part"  # the partition column that routes a row of a combined write to its output


def write_parquet_atomic_many(parts: list[tuple[Any, str | Path]], schema: pa.Schema | None = None,
                              expected_rows: int | None = None) -> list[int]:
    """Write several Ray datasets, each to its own directory as ``write_parquet_atomic`` does, in one Ray Data
    execution: their operators (e.g. the engines of several models) run side by side, and each output is still
    published on its own (a re-run redoes only what is missing). Returns the rows written per output."""
    import pyarrow.parquet as pq

    outs = [Path(out_dir) for _, out_dir in parts]
    tmps = [_fresh_tmp(out) for out in outs]
    repairs = [tmp.with_name(tmp.name + TEXT_REPAIRS) for tmp in tmps]
    # every shard gets the contract's schema (also a shard whose column is all null) and valid text
    conformed = [ds.map_batches(conform, fn_kwargs={"schema": schema, "repairs_dir": str(repairs[i])},
                                batch_format="pyarrow") for i, (ds, _) in enumerate(parts)]
    if len(parts) == 1:
        with expecting_rows(expected_rows):  # the progress line's total where Ray Data cannot know it
            conformed[0].write_parquet(str(tmps[0]))
        written = [tmps[0]]
    else:  # one write, partitioned by output, then each partition's files moved to its output's temporary dir
        tagged = [ds.map_batches(_tag_part, fn_kwargs={"part": i}, batch_format="pyarrow")
                  for i, ds in enumerate(conformed)]
        combined = tmps[0].with_name(tmps[0].name + "-all")
        with expecting_rows(expected_rows):
            tagged[0].union(*tagged[1:]).write_parquet(str(combined), partition_cols=[_PART])
        written = [combined / f"{_PART}={i}" for i in range(len(parts))]
        for source, tmp in zip(written, tmps):
            tmp.mkdir(parents=True, exist_ok=True)
            for file in source.glob("*.parquet") if source.is_dir() else []:
                file.rename(tmp / file.name)
        shutil.rmtree(combined, ignore_errors=True)
    rows_written = []
    for (ds, _), out, tmp, repairs_dir in zip(parts, outs, tmps, repairs):
        files = sorted(tmp.glob("*.parquet"))
        if not files:
            tmp.mkdir(parents=True, exist_ok=True)
            empty_schema = schema
            if empty_schema is None:
                empty_schema = ds.schema().base_schema if ds.schema() is not None else pa.schema([])
            pq.write_table(empty_schema.empty_table(), tmp / "empty.parquet")
            rows = 0
        else:
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        repaired = _sum_repairs(repairs_dir)
        shutil.rmtree(repairs_dir, ignore_errors=True)
        rows_written.append(_publish(tmp, out, rows, repaired))
    return rows_written


def _fresh_tmp(out: Path) -> Path:
    """A new temporary sibling of ``out``, after clearing what an interrupted write left there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"


def _publish(tmp: Path, out: Path, rows: int, repaired: dict[str, Any] | None) -> int:
    """Mark the finished temporary directory (rows, text repaired) and rename it into place."""
    marker: dict[str, Any] = {"rows": rows}
    if repaired:
        marker["text_repaired"] = repaired
        logger.info("%s: text that is not valid UTF-8 in %d rows (%s), written with U+FFFD for %d characters",
                    out, repaired["rows"], ", ".join(repaired["columns"]), repaired["characters"])
    (tmp / SUCCESS_MARKER).write_text(json.dumps(marker) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return rows


def _tag_part(table: pa.Table, part: int) -> pa.Table:
    return table.append_column(_PART, pa.array([part] * len(table), type=pa.int32()))


def write_rows_atomic(rows: list[dict[str, Any]], out_dir: str | Path, schema: pa.Schema) -> int:
    """Rows held on the driver (evaluation answers, judgments), written as ``write_parquet_atomic`` writes a dataset:
    ``schema``'s columns, text repaired and counted, published whole. Arrow writes them here: a Ray Data write of a
    few hundred rows costs 2-5 s of task starts on 2 cores."""
    repaired_rows, characters, columns, arrays = [False] * len(rows), 0, [], []
    for column in schema:
        values, replaced = _clean_values([row.get(column.name) for row in rows], repaired_rows)
        if replaced:
            characters += replaced
            columns.append(column.name)
        arrays.append(pa.array(values, type=column.type))
    repaired = ({"rows": sum(repaired_rows), "characters": characters, "columns": sorted(columns)}
                if characters else None)
    return write_table_atomic(pa.Table.from_arrays(arrays, schema=schema), out_dir, repaired)


def write_table_atomic(table: pa.Table, out_dir: str | Path, repaired: dict[str, Any] | None = None) -> int:
    """An Arrow table on the driver (valid text, as Arrow strings are) as a ``write_parquet_atomic`` output."""
    import pyarrow.parquet as pq

    out = Path(out_dir)
    tmp = _fresh_tmp(out)
    tmp.mkdir()
    pq.write_table(table, tmp / "rows.parquet")
    return _publish(tmp, out, table.num_rows, repaired)


def write_validated(result: Validated, out_dir: str | Path, rejects_dir: str | Path,
                    contract: type[Row]) -> ValidationReport:
    """Write accepted rows and rejects side by side, and check that what was written adds up to what was read."""
    accepted = write_parquet_atomic(result.accepted, out_dir, schema=contract.arrow_schema())
    rejected = write_parquet_atomic(result.rejected, rejects_dir, schema=REJECT_SCHEMA)
    report = result.report
    if (accepted, rejected) != (report.accepted, report.rejected):
        raise RuntimeError(f"row accounting broke: wrote {accepted}+{rejected}, validated "
                           f"{report.accepted}+{report.rejected} of {report.total}")
    return report


def column_sum(out_dir: str | Path, column: str) -> float:
    """The sum of a numeric column of a ``write_parquet_atomic`` output, read here with Arrow column by column: a
    Ray aggregate starts an aggregator actor (~5 s on 2 cores) for what is one column of a stage's output."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    total = 0
    for batch in pads.dataset(str(out_dir), format="parquet").to_batches(columns=[column]):
        total += pc.sum(batch[column]).as_py() or 0
    return total


CPU_GROUP_AGGREGATORS = 8  # group-by aggregator actors while no node of the CPU worker group is up yet


def configure_ray_data(small_cluster: bool, cpu_work_selector: dict[str, str] | None = None,
                       cpu_work_cpus: float = 0.0) -> None:
    """Ray Data settings for this driver (after ``ray.init``).

    - Parquet reads take Ray's V1 datasource: 2.60's V2 reader starts a pool of 32 footer-reader actors (one Python
      process each) for every ``read_parquet``, 3-4 s per read on a 2-core machine and idle work on any cluster for
      stage outputs of a few files. V1 reads their footers in the driver (0.4 s here).
    - On a small (CPU) cluster, group-bys (dedupe, binarize) take Ray's task-based sort shuffle: 2.60's default
      (SHUFFLE_V2) starts its map and reduce operators' actors for every group-by, 8 s of a 144-row validation on
      4 logical CPUs against 0.5 s (HASH_SHUFFLE, one partition per CPU instead of Ray's fixed 200: 4 s). GPU
      clusters keep Ray's default (an autoscaling cluster's CPU count at start says little).
    - Values Arrow cannot hold become pickled Python objects (Ray's fallback, set explicitly: no warning), so a
      judge's answer with a lone surrogate reaches the writer, which repairs and counts it (``conform``).
    - ``cpu_work_selector`` (the recipe's CPU worker group, ``cpu_work_cpus`` of its CPUs up now) goes on every task
      and actor Ray Data starts: reads, validation, templating, the endpoint judge, shuffles, writes. Engine
      operators override it (``engines.keep_engines_off_cpu_nodes``). Group-bys then take Ray's HASH_SHUFFLE, whose
      tasks and aggregator actors carry the selector (2.60's default SHUFFLE_V2 operators leave it out and land
      anywhere), with at most one aggregator per two CPUs of the group: Ray sizes them by the whole cluster's CPUs,
      and an aggregator that finds no room on the group's nodes stalls the shuffle for good.
    """
    import ray
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    context = DataContext.get_current()
    context.use_datasource_v2 = False
    # a value Arrow cannot hold (text with a lone surrogate) stays a Python object until the writer repairs it
    context.enable_fallback_to_arrow_object_ext_type = True
    context.execution_options.label_selector = cpu_work_selector
    shuffle_cpus = ray.cluster_resources().get("CPU", 1)
    if cpu_work_selector:
        context.shuffle_strategy = ShuffleStrategy.HASH_SHUFFLE
        aggregators = max(1, int(cpu_work_cpus // 2)) if cpu_work_cpus else CPU_GROUP_AGGREGATORS
        context.max_hash_shuffle_aggregators = aggregators
        shuffle_cpus = aggregators
    if small_cluster:
        context.default_hash_shuffle_parallelism = max(1, min(int(shuffle_cpus), 200))
        if not cpu_work_selector:  # tasks only: no shuffle operators' actors to start for a few thousand rows
            context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


def read_contract(*out_dirs: str | Path) -> Any:
    """Read directories written by ``write_parquet_atomic`` back into one Ray dataset (refuses incomplete ones)."""
    import ray.data

    for out_dir in out_dirs:
        if not is_complete(out_dir):
            raise FileNotFoundError(f"{out_dir}: not a complete stage output (no {SUCCESS_MARKER}); run its stage")
    return ray.data.read_parquet([str(d) for d in out_dirs], file_extensions=["parquet"])


VALIDATION_REPORT = "_validation.json"


def validated_once(source: Any, contract: type[Row], out_dir: Path, rejects_dir: Path,
                   screen: Any = None) -> dict[str, Any]:
    """Validate a stage's input into ``out_dir`` (+ rejects) unless an earlier run already did; returns the counts
    (kept beside the rows, so a re-run reports what the first run found)."""
    if is_complete(out_dir) and is_complete(rejects_dir):
        if (out_dir / VALIDATION_REPORT).is_file():
            return json.loads((out_dir / VALIDATION_REPORT).read_text())
        accepted = json.loads((out_dir / SUCCESS_MARKER).read_text())["rows"]
        rejected = json.loads((rejects_dir / SUCCESS_MARKER).read_text())["rows"]
        return {"source": source.path, "total": accepted + rejected, "accepted": accepted, "rejected": rejected}
    result = load(source.path, contract, split=source.split, name=source.name, limit=source.limit, screen=screen)
    counts = write_validated(result, out_dir, rejects_dir, contract).as_dict()
    (out_dir / VALIDATION_REPORT).write_text(json.dumps(counts, indent=2) + "\n")
    return counts
