"""The progress line a stage prints from Ray Data's reports: the stage's own total, and a rate and ETA only from rows
that came out (not from an engine's start). Records in Ray Data's wording (``logging_progress``), a clock we set."""

import logging

from zephyr_ray.console import _ProgressLines, expecting_rows


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(handler: _ProgressLines, clock: Clock, at: float, message: str) -> None:
    clock.now = 1000.0 + at
    handler.emit(logging.LogRecord("ray.data", logging.INFO, __file__, 0, message, None, None))


def test_no_rate_or_eta_while_the_engine_starts_then_the_rate_of_rows_since_the_first(capsys):
    clock = Clock()
    lines = _ProgressLines(clock=clock)
    report(lines, clock, 0, "Running Dataset: judge_7. Active & requested resources: 1/4 CPU")
    report(lines, clock, 0.5, "Total Progress: 0/576")  # just started: nothing to say
    report(lines, clock, 5, "Total Progress: 1/576")  # a row through, the engine still starting
    report(lines, clock, 20, "Total Progress: 1/576")
    report(lines, clock, 25, "Total Progress: 101/576")  # the engine answering: 100 rows in the 20 s since
    report(lines, clock, 30, "Total Progress: 576/576")
    assert capsys.readouterr().out.splitlines() == [
        "  ... 1/576 rows (5s)",
        "  ... 1/576 rows (20s)",
        "  ... 101/576 rows, 5.0 rows/s, ETA 95s (25s)",
        "  ... 576/576 rows, 23.0 rows/s (30s)"]


def test_the_stages_own_total_over_ray_datas_estimate(capsys):
    clock = Clock()
    lines = _ProgressLines(clock=clock)
    with expecting_rows(288):  # two pool models' 144 prompts each
        report(lines, clock, 0, "Running Dataset: complete_3")
        report(lines, clock, 5, "Total Progress: 0/16")
        report(lines, clock, 10, "Total Progress: 15/16")
    report(lines, clock, 0, "Running Dataset: other_4")
    report(lines, clock, 5, "Total Progress: 7/?")  # no total from anyone
    assert capsys.readouterr().out.splitlines() == [
        "  ... 0/288 rows (5s)", "  ... 15/288 rows (10s)", "  ... 7 rows so far (5s)"]
