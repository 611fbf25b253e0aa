"""The progress line a stage prints from Ray Data's reports: the stage's own total, and a rate and ETA only from rows
that came out (not from an engine's start). Records in Ray Data's wording (``logging_progress``), a clock we set."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from zephyr_ray.console import PROGRESS_INTERVAL_S, _ProgressLines, expecting_rows


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


@pytest.mark.parametrize("ray_data_first, user_interval, expected", [
    (False, None, PROGRESS_INTERVAL_S), (True, None, PROGRESS_INTERVAL_S), (False, "30", 30)])
def test_ray_data_reports_at_our_interval_or_the_users_without_being_imported_for_it(
        tmp_path, ray_data_first, user_interval, expected):
    """A command's quiet console sets how often Ray Data reports progress, whether Ray Data comes in before it or
    after; it does not import Ray Data itself (over a second at start-up of commands that never use it), and a user's
    own ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` wins."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        if {ray_data_first}:
            import ray.data._internal.progress.logging_progress
        from zephyr_ray import console
        console.owns_process = True
        console.quiet_console(Path(sys.argv[1]))
        console.echo(f"imported: {{'ray.data' in sys.modules}}")
        from ray.data._internal.progress.logging_progress import LoggingExecutionProgressManager
        console.echo(f"interval: {{LoggingExecutionProgressManager.LOG_REPORT_INTERVAL_SEC}}")
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"}
    env.update({"RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": user_interval} if user_interval else {})
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "command.log")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, (tmp_path / "command.log").read_text()[-3000:]
    assert run.stdout.splitlines() == [f"imported: {ray_data_first}", f"interval: {expected}"], run.stdout
