"""Hostile input, property-based (Hypothesis): any recipe file and any dataset row ends in a clear error or a counted
reject that names the file, row or field; never a traceback, a hang or a silent drop."""

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zephyr_ray.config import Recipe, RecipeError, load_recipe
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


def assert_clear_recipe_outcome(path: Path) -> None:
    try:
        recipe = load_recipe(path)
    except RecipeError as err:
        assert err.problems and all(p.startswith(str(path)) for p in err.problems), err.problems
        assert all("Traceback" not in p for p in err.problems)
    else:
        assert isinstance(recipe, Recipe)


@PROPERTY
@given(data=st.data())
def test_any_mutation_of_a_recipe_loads_or_names_file_and_key(tmp_path, data):
    paths = list(key_paths(TINY))
    path = data.draw(st.sampled_from(paths))
    action = data.draw(st.sampled_from(["delete", "replace", "wrap"]))
    document = mutate(TINY, path, action, data.draw(json_values))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(document, allow_unicode=False))
    assert_clear_recipe_outcome(recipe)


@PROPERTY
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
@example(content=b"[" * 20_000)  # nested deeper than any parser's recursion
@example(content=b"a: &a [*a]")  # an alias inside itself
@example(content=b"name: x\nhardware: {num_workers: 1" + b"0" * 5000 + b"}")  # an integer of 5001 digits
@example(content=b"name: x\nx: !!python/object/apply:os.system [echo pwned]")  # code execution through tags
@example(content=b"\xff\xfe\x00")
def test_any_bytes_as_a_recipe_load_or_fail_with_one_line_per_problem(tmp_path, content):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    assert_clear_recipe_outcome(recipe)


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


def assert_one_outcome(raw, contract_name):
    contract = CONTRACTS[contract_name]
    accepted, reject = check_row(raw, None, contract)
    assert (accepted is None) != (reject is None)
    if reject is not None:
        assert isinstance(reject["reason"], str) and reject["reason"], reject
        assert reject["field"] is None or isinstance(reject["field"], str)
    else:
        assert check_row(json.dumps(accepted), None, contract)[0] == accepted  # what is kept validates again


@pytest.mark.parametrize("contract", sorted(VALID_ROWS))
def test_the_valid_examples_are_accepted(contract):
    assert check_row(json.dumps(VALID_ROWS[contract]), None, CONTRACTS[contract])[0] is not None


@PROPERTY
@given(data=st.data())
def test_any_mutated_row_is_accepted_or_rejected_with_a_reason(data):
    contract = data.draw(st.sampled_from(sorted(VALID_ROWS)))
    row = VALID_ROWS[contract]
    path = data.draw(st.sampled_from(list(key_paths(row))))
    action = data.draw(st.sampled_from(["delete", "replace", "wrap"]))
    mutated = mutate(row, path, action, data.draw(json_values))
    assert_one_outcome(json.dumps(mutated), contract)


@PROPERTY
@given(contract=st.sampled_from(sorted(VALID_ROWS)), raw=st.one_of(st.text(max_size=200), json_values.map(json.dumps)))
@example(contract="prompt", raw="[" * 100_000)
@example(contract="prompt", raw='{"prompt": 1' + "0" * 5000 + "}")
@example(contract="prompt", raw='{"prompt": "\\ud800"}')
@example(contract="dialogue", raw='{"messages": []}')
@example(contract="dialogue", raw='{"messages": [{"role": "tool", "content": "x"}]}')
@example(contract="prompt", raw=json.dumps({"prompt": "x" * 10_000_000}))
def test_any_text_as_a_row_is_accepted_or_rejected_with_a_reason(contract, raw):
    assert_one_outcome(raw, contract)


@PROPERTY
@given(lines=st.lists(st.binary(max_size=60), max_size=20))
def test_every_line_of_any_bytes_becomes_a_row_or_a_decode_error(lines):
    data = b"\n".join(lines)
    (table,) = list(_jsonl_rows({"path": ["data.jsonl"], "bytes": [data]}))
    rows = table.to_pylist()
    assert len(rows) == sum(1 for line in data.split(b"\n") if line.strip())  # nothing dropped
    for row in rows:
        if row["_decode_error"] is None:
            assert_one_outcome(row["_raw"], "prompt")
        else:
            assert row["_decode_error"].startswith("not valid UTF-8")
