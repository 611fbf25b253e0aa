"""The reliability page (docs/reliability.md) from one test run's log (tests/conftest.py writes it).

    python scripts/reliability_table.py [runs/reliability.jsonl] [--out docs/reliability.md] [--tests tests]

Every case of the page is a test marked `@pytest.mark.reliability(kind, case)` under --tests (found in the source,
so a case whose test was not collected is listed too). Each row says what the run that wrote the log saw: passed
(with what the test recorded), failed (with the test id and the error), skipped, or not run. The log holds one run:
conftest.py starts it afresh at each test session with a header line (run id, time, commit); any line of another
run (or one of the older format, without a run id) is not this run's and is ignored.
A test that calls record_reliability without the mark is named in a warning on stderr.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HEADER = """# Reliability: faults and hostile input, tried

Each row is one case, tried by the test named in it (marked `@pytest.mark.reliability` in `tests/`), with its
status in the test run that wrote this page: **passed** (what the test saw, recorded after its checks passed),
**failed** (the test and its error), **skipped**, or **not run**. `make test` logs the run to
`runs/reliability.jsonl` (afresh each run); `python scripts/reliability_table.py runs/reliability.jsonl --out
docs/reliability.md` writes this page from it, and CI prints it after the suite. "Lost" must be nothing: every row
in, every finished stage, every request accounted for; the one exception is a request in flight on a Serve replica
that dies, which its client sees fail (counted in the row).

"""


@dataclass
class Case:
    kind: str
    case: str
    test: str  # file::function: the test's id without its folder and parameters
    outcomes: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    @property
    def status(self) -> str:
        if any(o["outcome"] == "failed" for o in self.outcomes):
            return "failed"
        if any(o["outcome"] == "passed" and o.get("when") == "call" for o in self.outcomes):
            return "passed"
        if self.outcomes:
            return "skipped"
        return "passed" if self.records else "not run"  # records without outcomes: a log of hand-run code


def function_id(nodeid: str) -> str:
    """tests/test_x.py::test_y[param] -> test_x.py::test_y"""
    return nodeid.split("[", 1)[0].rsplit("/", 1)[-1]


def test_functions(tests: Path) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(file::function, its ast node) of every test module's top-level function in tests/test_*.py."""
    return [(f"{path.name}::{node.name}", node) for path in sorted(tests.glob("test_*.py"))
            for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def registered_cases(functions: list[tuple[str, ast.AST]]) -> dict[str, Case]:
    """Every test function (of ``test_functions``) marked `@pytest.mark.reliability(kind, case)`, by function id."""
    cases = {}
    for test, node in functions:
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "pytest.mark.reliability":
                kind, case = (ast.literal_eval(arg) for arg in decorator.args[:2])
                cases[test] = Case(kind, case, test)
    return cases


def unmarked_recorders(functions: list[tuple[str, ast.AST]], registered: dict[str, Case]) -> list[str]:
    """Tests that call record_reliability without the mark: the page would miss their case whenever they fail
    before recording or are not run."""
    return [test for test, node in functions if test not in registered and any(
        isinstance(call, ast.Call) and getattr(call.func, "id", None) == "record_reliability"
        for call in ast.walk(node))]


def read_run(log: Path) -> tuple[dict | None, list[dict]]:
    """The run header of ``log`` and the lines of that run (lines of any other run, or without a run id, dropped).
    A line that is not JSON (a run killed mid-write) is skipped."""
    lines = []
    for text in log.read_text(encoding="utf-8").splitlines() if log.is_file() else []:
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    headers = [line for line in lines if line.get("type") == "run"]
    if not headers:
        return None, []
    run = headers[-1]  # the file is started afresh per run; if runs were ever concatenated, the last one counts
    return run, [line for line in lines if line.get("run") == run["run"] and line.get("type") != "run"]


def collect(run_lines: list[dict], registry: dict[str, Case]) -> list[Case]:
    cases = {test: Case(c.kind, c.case, c.test) for test, c in registry.items()}
    for line in run_lines:
        if line.get("type") not in ("outcome", "record"):
            continue
        test = function_id(line.get("test", ""))
        if test not in cases:  # a test that recorded a case without the marker: shown, as the run saw it
            cases[test] = Case(line.get("kind", "?"), line.get("case", test), test)
        (cases[test].outcomes if line["type"] == "outcome" else cases[test].records).append(line)
    return sorted(cases.values(), key=lambda c: (c.kind, c.case))


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(cases: list[Case]) -> str:
    lines = ["| status | class | case | what happened | lost | test |", "|---|---|---|---|---|---|"]
    for c in cases:
        status, name = c.status, c.test.split("::")[-1]
        if status == "passed" and c.records:
            happened, lost, test = c.records[-1]["happened"], c.records[-1]["lost"], f"`{name}`"
        elif status == "passed":
            happened, lost, test = "passed; nothing recorded", "not recorded", f"`{name}`"
        elif status == "failed":
            failures = [o for o in c.outcomes if o["outcome"] == "failed"]
            happened = "; ".join(f"{o['when']} failed: {o.get('message') or 'no message'}" for o in failures[:3])
            lost, test = "not known: the test failed", ", ".join(sorted({f"`{o['test']}`" for o in failures}))
        elif status == "skipped":
            reasons = sorted({o.get("message") or "no reason given" for o in c.outcomes})
            happened, lost, test = "skipped: " + "; ".join(reasons), "not known: not tried", f"`{name}`"
        else:
            happened, lost, test = "not run in this run", "not known: not tried", f"`{name}`"
        cells = [f"**{status}**", c.kind, c.case, happened, lost, test]
        lines.append("| " + " | ".join(cell(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


def summary(run: dict | None, lines: list[dict], cases: list[Case]) -> str:
    counts = {}
    for c in cases:
        counts[c.status] = counts.get(c.status, 0) + 1
    tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no cases"
    if run is None:
        return f"No test run logged (no run header in the log): every case is not run. {len(cases)} cases: {tally}.\n"
    commit = (run.get("commit") or "unknown")[:12] + (" with local changes" if run.get("local_changes") else "")
    args = " ".join(run.get("args") or [])
    end = next((line for line in reversed(lines) if line.get("type") == "end"), None)
    ended = (f"finished {end.get('finished', '?')} with exit status {end.get('exitstatus', '?')}" if end else
             "did not finish (no end in the log: stopped or still running)")
    return (f"From test run `{run['run']}` (`pytest{' ' + args if args else ''}`), started {run.get('started', '?')} "
            f"at commit `{commit}`, {ended}. {len(cases)} cases: {tally}.\n")


def page(log: Path, registry: dict[str, Case]) -> str:
    run, lines = read_run(log)
    cases = collect(lines, registry)
    return HEADER + summary(run, lines, cases) + "\n" + table(cases)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", nargs="?", default="runs/reliability.jsonl")
    parser.add_argument("--out", help="write the page here instead of printing it")
    parser.add_argument("--tests", default=str(REPO / "tests"), help="where the marked tests are (default: tests/)")
    args = parser.parse_args()
    functions = test_functions(Path(args.tests))  # every test file parsed once, for both
    registry = registered_cases(functions)
    for test in unmarked_recorders(functions, registry):
        print(f"warning: {test} calls record_reliability but has no @pytest.mark.reliability(kind, case): "
              "the page lists its case only when it records", file=sys.stderr)
    text = page(Path(args.log), registry)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
