"""The reliability table (docs/reliability.md) from what the tests recorded (tests/conftest.py:record_reliability).

    python scripts/reliability_table.py [runs/reliability.jsonl] [--out docs/reliability.md]

The last record of each (kind, case) wins, so a file several test runs appended to gives one row per case.
"""

import argparse
import json
from pathlib import Path

HEADER = """# Reliability: faults and hostile input, tried

Every row was written by the test that tried the case, after its checks passed (`tests/conftest.py:
record_reliability`); `python scripts/reliability_table.py runs/reliability.jsonl --out docs/reliability.md` rebuilds
this page from a test run, and CI prints it after the suite. "Lost" must be nothing: every row in, every finished
stage, every request accounted for; the one exception is a request in flight on a Serve replica that dies, which
its client sees fail (counted in the row).

"""


def table(records: list[dict]) -> str:
    latest = {(r["kind"], r["case"]): r for r in records}
    lines = ["| class | case | what happened | lost | test |", "|---|---|---|---|---|"]
    for (kind, case), r in sorted(latest.items()):
        cells = [kind, case, r["happened"], r["lost"], f"`{r['test'].split('::')[-1]}`"]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", nargs="?", default="runs/reliability.jsonl")
    parser.add_argument("--out", help="write the page here instead of printing the table")
    args = parser.parse_args()
    path = Path(args.log)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if args.out:
        Path(args.out).write_text(HEADER + table(records))
    else:
        print(table(records), end="")
