"""scripts/reliability_table.py and the run log tests/conftest.py writes: each row says what the run that wrote the
page saw (passed, failed, skipped, not run), never an older run's record. Fast: no engines.

The script runs as CI runs it, in a process of its own. In-process, its `ast.parse` could meet another thread's:
CPython 3.11 counts the AST constructor's recursion per interpreter, not per thread, and a test process holding Ray
may format a traceback (which parses source lines) in a background thread at any moment; the two then fail with
"SystemError: AST constructor recursion depth mismatch" (seen once in CI, in the test that reads every test file)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "scripts" / "reliability_table.py"

CASES = '''
import pytest
from conftest import record_reliability


@pytest.mark.reliability("fault", "a process killed")
def test_passes():
    record_reliability("fault", "a process killed", "it came back", "nothing")


@pytest.mark.reliability("hostile input", "bad bytes")
def test_fails():
    assert 1 + 1 == 3, "the check broke"
    record_reliability("hostile input", "bad bytes", "all rejected", "nothing")


@pytest.mark.reliability("load", "many requests")
def test_not_run_here():
    record_reliability("load", "many requests", "all answered", "nothing")


def test_not_a_case():
    pass
'''


def rows(page: str) -> dict[str, list[str]]:
    """The table's rows by test column, each as its cells."""
    table = [line for line in page.splitlines() if line.startswith("| **")]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in table]
    return {row[-1]: row for row in cells}


def write_log(path: Path, *lines: dict) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def run_script(log: Path, tests: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPT), str(log), "--tests", str(tests)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def page_for(log: Path, tests: Path) -> str:
    """The page the script prints for this log and these tests."""
    return run_script(log, tests).stdout


def test_a_passed_a_failed_and_a_case_not_run_give_three_rows_with_those_statuses(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES)
    run = {"type": "run", "run": "r2", "started": "2026-12-01T10:00:00+00:00", "commit": "0123456789abcdef",
           "local_changes": False, "args": ["-k", "not not_run_here"]}
    write_log(tmp_path / "log.jsonl", run,
              {"type": "outcome", "run": "r2", "test": "tests/test_cases.py::test_passes", "when": "call",
               "outcome": "passed", "message": ""},
              {"type": "record", "run": "r2", "test": "tests/test_cases.py::test_passes", "kind": "fault",
               "case": "a process killed", "happened": "it came back", "lost": "nothing"},
              {"type": "outcome", "run": "r2", "test": "tests/test_cases.py::test_fails", "when": "call",
               "outcome": "failed", "message": "AssertionError: the check broke"},
              {"type": "end", "run": "r2", "finished": "2026-12-01T10:05:00+00:00", "exitstatus": 1})
    page = page_for(tmp_path / "log.jsonl", tmp_path)
    found = rows(page)
    assert len(found) == 3, page  # test_not_a_case is no case
    passed, failed, not_run = found["`test_passes`"], found["`tests/test_cases.py::test_fails`"], \
        found["`test_not_run_here`"]
    assert passed[:5] == ["**passed**", "fault", "a process killed", "it came back", "nothing"]
    assert failed[:3] == ["**failed**", "hostile input", "bad bytes"]
    assert "the check broke" in failed[3] and failed[4].startswith("not known")
    assert not_run[:4] == ["**not run**", "load", "many requests", "not run in this run"]
    assert "`r2`" in page and "2026-12-01T10:00:00" in page and "`0123456789ab`" in page and "exit status 1" in page
    assert "3 cases: 1 failed, 1 not run, 1 passed" in page


def test_an_older_runs_record_is_not_shown_as_this_runs(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES)
    old_format = {"kind": "load", "case": "many requests", "happened": "all answered (old)", "lost": "nothing",
                  "test": "tests/test_cases.py::test_not_run_here"}  # before run logs: no run id
    older_run = {"type": "record", "run": "r1", "test": "tests/test_cases.py::test_fails", "kind": "hostile input",
                 "case": "bad bytes", "happened": "all rejected (r1)", "lost": "nothing"}
    write_log(tmp_path / "log.jsonl", old_format, {"type": "run", "run": "r1"}, older_run,
              {"type": "outcome", "run": "r1", "test": "tests/test_cases.py::test_fails", "when": "call",
               "outcome": "passed"},
              {"type": "run", "run": "r2", "started": "2026-12-01T10:00:00+00:00", "commit": "abc"},
              {"type": "outcome", "run": "r2", "test": "tests/test_cases.py::test_fails", "when": "call",
               "outcome": "failed", "message": "AssertionError: broke"})
    found = rows(page_for(tmp_path / "log.jsonl", tmp_path))
    assert found["`test_not_run_here`"][0] == "**not run**"
    assert found["`tests/test_cases.py::test_fails`"][0] == "**failed**"
    assert "(old)" not in str(found) and "(r1)" not in str(found)
    # a log with no run at all: every case not run, none passed
    write_log(tmp_path / "old.jsonl", old_format)
    page = page_for(tmp_path / "old.jsonl", tmp_path)
    assert {row[0] for row in rows(page).values()} == {"**not run**"} and "No test run logged" in page


def test_a_parametrized_case_fails_if_any_of_its_tests_fails_and_a_skip_is_shown(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES)
    write_log(tmp_path / "log.jsonl", {"type": "run", "run": "r"},
              {"type": "outcome", "run": "r", "test": "x/test_cases.py::test_passes[a]", "when": "call",
               "outcome": "passed"},
              {"type": "record", "run": "r", "test": "x/test_cases.py::test_passes[a]", "kind": "fault",
               "case": "a process killed", "happened": "came back", "lost": "nothing"},
              {"type": "outcome", "run": "r", "test": "x/test_cases.py::test_passes[b]", "when": "setup",
               "outcome": "failed", "message": "RuntimeError: no engine"},
              {"type": "outcome", "run": "r", "test": "x/test_cases.py::test_fails", "when": "setup",
               "outcome": "skipped", "message": "needs a GPU"})
    found = rows(page_for(tmp_path / "log.jsonl", tmp_path))
    assert found["`x/test_cases.py::test_passes[b]`"][0] == "**failed**"
    assert "setup failed: RuntimeError: no engine" in found["`x/test_cases.py::test_passes[b]`"][3]
    assert found["`test_fails`"][:4] == ["**skipped**", "hostile input", "bad bytes", "skipped: needs a GPU"]


def test_conftest_logs_a_fresh_run_with_each_outcome(tmp_path):
    """The real hooks (tests/conftest.py as a plugin) on a small test file: the log starts afresh, holds the run's
    header, each reliability test's outcome and the passing test's record; the page made from it has three rows."""
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "test_cases.py").write_text(CASES)
    log = tmp_path / "reliability.jsonl"
    log.write_text(json.dumps({"kind": "load", "case": "many requests", "happened": "stale", "lost": "x",
                               "test": "cases/test_cases.py::test_not_run_here"}) + "\n")
    env = {**os.environ, "ZEPHYR_RAY_RELIABILITY_LOG": str(log), "PYTHONPATH": str(REPO / "tests")}
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
                           "--rootdir", str(tmp_path), "-k", "not not_run_here", str(cases)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # test_fails fails
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["type"] == "run" and lines[-1]["type"] == "end" and lines[-1]["exitstatus"] == 1
    assert "stale" not in log.read_text()
    outcomes = {(line["test"].split("::")[-1], line["outcome"]) for line in lines if line["type"] == "outcome"}
    assert outcomes == {("test_passes", "passed"), ("test_fails", "failed")}
    page = page_for(log, cases)
    statuses = {test: row[0] for test, row in rows(page).items()}
    assert statuses == {"`test_passes`": "**passed**", "`cases/test_cases.py::test_fails`": "**failed**",
                        "`test_not_run_here`": "**not run**"}, page
    assert "the check broke" in page


def test_every_test_that_records_a_case_is_marked_as_one(tmp_path):
    """A test calling record_reliability carries `@pytest.mark.reliability(kind, case)`, so the page lists its
    case even when the test fails before recording or does not run; the script warns about any that does not."""
    empty_log = tmp_path / "none.jsonl"
    empty_log.write_text("")
    ours = run_script(empty_log, REPO / "tests")
    assert "warning" not in ours.stderr, ours.stderr
    assert len(rows(ours.stdout)) >= 19
    (tmp_path / "test_cases.py").write_text(CASES + '''

def test_records_unmarked():
    record_reliability("fault", "a node lost", "it came back", "nothing")
''')
    warned = run_script(empty_log, tmp_path).stderr
    assert "test_cases.py::test_records_unmarked calls record_reliability" in warned
    assert warned.count("warning") == 1, warned  # the three marked tests are not named
