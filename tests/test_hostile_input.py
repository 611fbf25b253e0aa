"""Hostile input, property-based (Hypothesis): any recipe file and any dataset row ends in a clear error or a counted
reject that names the file, row or field; never a traceback, a hang or a silent drop."""

import copy
import json
from pathlib import Path

import pytest
import yaml
from conftest import record_reliability
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zephyr_ray.config import RecipeError, load_recipe
from zephyr_ray.data import CONTRACTS, _jsonl_rows, check_row

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "jobs" / "configs" / "tiny-cpu.yaml").read_text())
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.function_scoped_fixture])

# hostile scalars: control characters, NUL, lone surrogates, huge strings, huge and odd numbers
hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec=None, categories=["Cc", "Cs", "Zs"]), max_size=20),
    st.sampled_from(["", " ", "\x00", "\ud800", "x" * 200_000, "</s>", "<|user|>", "{{ 7*7 }}", "../../etc/passwd"]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    hostile_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(hostile_text, inner, max_size=4)),
                           max_leaves=12)


def key_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from key_paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from key_paths(item, (*path, i))


def mutate(document, path, action, replacement):
    """``document`` with the value at ``path`` deleted, replaced, or wrapped in a list."""
    document = copy.deepcopy(document)
    if not path:
        return replacement
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "wrap":
        parent[path[-1]] = [parent[path[-1]]]
    else:
        parent[path[-1]] = replacement
    return document


class Tally:
    """How many cases a property test ran and how they ended, for the reliability table."""

    def __init__(self) -> None:
        self.cases, self.outcomes = 0, {}

    def add(self, outcome: str) -> None:
        self.cases += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def __str__(self) -> str:
        return f"{self.cases} cases: " + ", ".join(f"{n} {o}" for o, n in sorted(self.outcomes.items()))


def recipe_outcome(path: Path) -> str:
    try:
        load_recipe(path)
    except RecipeError as err:
        assert err.problems and all(p.startswith(str(path)) for p in err.problems), err.problems
        return "clear errors naming the file"
    return "loaded"


@pytest.mark.reliability(
    "hostile input",
    "recipe YAMLs: tiny-cpu.yaml with a key deleted, wrapped in a list or replaced by any JSON value "
    "(control characters, NUL, lone surrogates, 200 kB strings, NaN, huge numbers, nesting)")
def test_any_mutation_of_a_recipe_loads_or_names_file_and_key(tmp_path):
    tally = Tally()

    @PROPERTY
    @given(data=st.data())
    def mutated_recipe(data):
        path = data.draw(st.sampled_from(list(key_paths(TINY))))
        action = data.draw(st.sampled_from(["delete", "replace", "wrap"]))
        document = mutate(TINY, path, action, data.draw(json_values))
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(document, allow_unicode=False))
        tally.add(recipe_outcome(recipe))

    mutated_recipe()
    record_reliability("hostile input", "recipe YAMLs: tiny-cpu.yaml with a key deleted, wrapped in a list or "
                       "replaced by any JSON value (control characters, NUL, lone surrogates, 200 kB strings, NaN, "
                       "huge numbers, nesting)", str(tally), "nothing: no traceback, every problem names the file")


@pytest.mark.reliability(
    "hostile input",
    "recipe files of any bytes (invalid UTF-8, YAML nested 20,000 deep, an alias inside itself, a "
    "5001-digit number, a `!!python/object/apply` tag)")
def test_any_bytes_as_a_recipe_load_or_fail_with_one_line_per_problem(tmp_path):
    tally = Tally()

    @PROPERTY
    @given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
    @example(content=b"[" * 20_000)  # nested deeper than any parser's recursion
    @example(content=b"a: &a [*a]")  # an alias inside itself
    @example(content=b"name: x\nhardware: {num_workers: 1" + b"0" * 5000 + b"}")  # an integer of 5001 digits
    @example(content=b"name: x\nx: !!python/object/apply:os.system [echo pwned]")  # code execution through tags
    @example(content=b"\xff\xfe\x00")
    def any_bytes(content):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_bytes(content)
        tally.add(recipe_outcome(recipe))

    any_bytes()
    record_reliability("hostile input", "recipe files of any bytes (invalid UTF-8, YAML nested 20,000 deep, an alias "
                       "inside itself, a 5001-digit number, a `!!python/object/apply` tag)", str(tally),
                       "nothing: no traceback, no code run")


VALID_ROWS = {
    "prompt": {"prompt": "How do bees make honey?"},
    "dialogue": {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello!"}]},
    "completion": {"prompt": "Hi", "prompt_id": "x", "model": "m", "messages": [{"role": "user", "content": "Hi"}],
                   "completion": "Hello", "sampling_params": "{}", "num_prompt_tokens": 1,
                   "num_generated_tokens": 1, "finish_reason": "stop"},
    "preference": {"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}],
                   "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "B"}],
                   "score_chosen": 9, "score_rejected": 2.5},
    "question": {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
    "reference_answer": {"question_id": 81, "choices": [{"index": 0, "turns": ["A", "B"]}]},
    "instruction": {"instruction": "Say hi.", "output": "Hi!", "generator": "ref", "dataset": "x"},
}
VALID_ROWS["judgment"] = {**VALID_ROWS["completion"], "judge": "j"}


def assert_one_outcome(raw, contract_name) -> str:
    contract = CONTRACTS[contract_name]
    accepted, reject = check_row(raw, None, contract)
    assert (accepted is None) != (reject is None)
    if reject is not None:
        assert isinstance(reject["reason"], str) and reject["reason"], reject
        assert reject["field"] is None or isinstance(reject["field"], str)
        return "rejected with a reason"
    assert check_row(json.dumps(accepted), None, contract)[0] == accepted  # what is kept validates again
    return "accepted"


@pytest.mark.parametrize("contract", sorted(VALID_ROWS))
def test_the_valid_examples_are_accepted(contract):
    assert check_row(json.dumps(VALID_ROWS[contract]), None, CONTRACTS[contract])[0] is not None


@pytest.mark.reliability(
    "hostile input",
    "dataset rows of every contract with a field deleted, wrapped or replaced (wrong types, missing keys, "
    "huge strings, control characters, lone surrogates, wrong roles, empty conversations)")
def test_any_mutated_row_is_accepted_or_rejected_with_a_reason():
    tally = Tally()

    @PROPERTY
    @given(data=st.data())
    def mutated_row(data):
        contract = data.draw(st.sampled_from(sorted(VALID_ROWS)))
        row = VALID_ROWS[contract]
        path = data.draw(st.sampled_from(list(key_paths(row))))
        action = data.draw(st.sampled_from(["delete", "replace", "wrap"]))
        mutated = mutate(row, path, action, data.draw(json_values))
        tally.add(assert_one_outcome(json.dumps(mutated), contract))

    mutated_row()
    record_reliability("hostile input", f"dataset rows of all {len(VALID_ROWS)} contracts with a field deleted, "
                       "wrapped or replaced (wrong types, missing keys, huge strings, control characters, lone "
                       "surrogates, wrong roles, empty conversations)", str(tally),
                       "nothing: every row accepted or rejected with field and reason")


@pytest.mark.reliability(
    "hostile input",
    "any text as a row (not JSON, JSON nested 100,000 deep, a 5001-digit number, a lone surrogate, a 10 "
    "MB prompt, empty conversations, a `tool` role)")
def test_any_text_as_a_row_is_accepted_or_rejected_with_a_reason():
    tally = Tally()

    @PROPERTY
    @given(contract=st.sampled_from(sorted(VALID_ROWS)),
           raw=st.one_of(st.text(max_size=200), json_values.map(json.dumps)))
    @example(contract="prompt", raw="[" * 100_000)
    @example(contract="prompt", raw='{"prompt": 1' + "0" * 5000 + "}")
    @example(contract="prompt", raw='{"prompt": "\\ud800"}')
    @example(contract="dialogue", raw='{"messages": []}')
    @example(contract="dialogue", raw='{"messages": [{"role": "tool", "content": "x"}]}')
    @example(contract="prompt", raw=json.dumps({"prompt": "x" * 10_000_000}))
    def any_text(contract, raw):
        tally.add(assert_one_outcome(raw, contract))

    any_text()
    record_reliability("hostile input", "any text as a row (not JSON, JSON nested 100,000 deep, a 5001-digit number, "
                       "a lone surrogate, a 10 MB prompt, empty conversations, a `tool` role)", str(tally),
                       "nothing: every row accepted or rejected with a reason")


@pytest.mark.reliability("hostile input", "JSONL files of any bytes (invalid UTF-8, blank and broken lines)")
def test_every_line_of_any_bytes_becomes_a_row_or_a_decode_error():
    tally = Tally()

    @PROPERTY
    @given(lines=st.lists(st.binary(max_size=60), max_size=20))
    def any_lines(lines):
        data = b"\n".join(lines)
        (table,) = list(_jsonl_rows({"path": ["data.jsonl"], "bytes": [data]}))
        rows = table.to_pylist()
        lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")  # a leading byte-order mark is not a row's
        assert len(rows) == sum(1 for line in lines if line.strip())  # nothing dropped
        for row in rows:
            if row["_decode_error"] is None:
                tally.add(assert_one_outcome(row["_raw"], "prompt"))
            else:
                assert row["_decode_error"].startswith("not valid UTF-8")
                tally.add("rejected as not UTF-8")

    any_lines()
    record_reliability("hostile input", "JSONL files of any bytes (invalid UTF-8, blank and broken lines)", str(tally),
                       "nothing: every non-blank line is a row or a counted decode error")


def test_a_byte_order_mark_is_not_part_of_the_first_row():
    """What Windows editors write first: a JSONL file's row 1 and a JSON list (AlpacaEval's format) read as
    without it."""
    row = {"instruction": "How do bees make honey?", "dataset": "helpful_base"}
    bom = b"\xef\xbb\xbf"
    files = {"data.jsonl": bom + (json.dumps(row) + "\n" + json.dumps(row) + "\n").encode(),
             "data.json": bom + json.dumps([row, row]).encode()}
    for name, data in files.items():
        (table,) = list(_jsonl_rows({"path": [name], "bytes": [data]}))
        rows = table.to_pylist()
        assert [(r["_row"], json.loads(r["_raw"]), r["_decode_error"]) for r in rows] == [(1, row, None),
                                                                                          (2, row, None)], name


@pytest.mark.reliability(
    "hostile input",
    "whole JSONL files through Ray Data: valid, hostile and non-UTF-8 lines and repeated prompts mixed")
def test_whole_files_of_hostile_rows_are_accounted_for_row_by_row(ray_local, tmp_path):
    """Through Ray Data as a stage reads them: files mixing valid rows, hostile rows, invalid UTF-8 lines and repeated
    prompts; accepted + rejected = lines, each reject with its file row and reason, repeats rejected after the
    first."""
    from zephyr_ray.data import PromptRow, load

    seen = {"files": 0, "lines": 0, "kept": 0, "rejected": 0}

    @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rows=st.lists(st.one_of(
        st.sampled_from(["How do bees fly?", "Why is the sky blue?", "Name a fruit."]).map(
            lambda p: json.dumps({"prompt": p}).encode()),  # valid, often repeated
        json_values.map(lambda v: json.dumps({"prompt": v}).encode()),
        st.binary(max_size=30).filter(lambda b: b"\n" not in b and b.strip())), min_size=1, max_size=60))
    def hostile_file(rows):
        path = tmp_path / f"prompts-{seen['files']}.jsonl"
        path.write_bytes(b"\n".join(rows) + b"\n")
        result = load(str(path), PromptRow)
        accepted, rejected = result.accepted.take_all(), result.rejected.take_all()
        assert len(accepted) + len(rejected) == len(rows) == result.report.total
        assert len({r["prompt_id"] for r in accepted}) == len(accepted), "a repeated prompt was kept"
        assert len({r["row"] for r in rejected}) == len(rejected), "a line was rejected twice"
        assert all(r["reason"] and r["source"] == str(path) and 1 <= r["row"] <= len(rows) for r in rejected)
        for key, n in (("files", 1), ("lines", len(rows)), ("kept", len(accepted)), ("rejected", len(rejected))):
            seen[key] += n

    hostile_file()
    record_reliability("hostile input", "whole JSONL files through Ray Data: valid, hostile and non-UTF-8 lines and "
                       "repeated prompts mixed", f"{seen['files']} files, {seen['lines']} lines: {seen['kept']} kept, "
                       f"{seen['rejected']} rejected, each with its row number and reason; repeats rejected after "
                       "the first", "nothing")
