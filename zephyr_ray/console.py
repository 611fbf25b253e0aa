"""What a user sees: our own lines and progress on the terminal, every library's output in a log file.

vLLM, Ray, DeepSpeed and transformers print a great deal, from many processes (engine cores, Ray workers, resource
trackers), and some of it is tracebacks of harmless shutdown races. Filtering that stream line by line never ends, so
``quiet_console`` turns it around: from then on the process' stdout and stderr (file descriptors 1 and 2, which child
processes inherit, and Python's ``sys.stdout``/``sys.stderr``) go to the log file, and only what this package says is
written to the terminal: ``echo`` lines, the ``zephyr_ray`` loggers' INFO lines (each stage's counts and rates), and
a progress line every few seconds taken from Ray Data's own progress reports (rows done of the total, rate, ETA).
``--verbose`` leaves everything on the terminal instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

PROGRESS_INTERVAL_S = 5  # seconds between progress lines
# What a user reads as "something went wrong": none of it may show on a successful run's terminal (CI's check of the
# demo and the first-hour tests hold every command to it).
NOISE = re.compile(r"Traceback|WARNING|Warning|warnings\.warn|Error|Exception|KeyError|resource_tracker")
_RAY_DATA_PROGRESS = "ray.data._internal.progress.logging_progress"
# Only a process that is the command itself (``cli.main``) hands its file descriptors over; a command invoked
# in-process (tests through typer's CliRunner, a notebook) keeps its host's output as it is.
owns_process = False
_expected_rows: int | None = None  # the total of the pass running now, when Ray Data's own is unknown
_terminal: TextIO | None = None  # the user's stdout, set by quiet_console; None: write to sys.stdout
_terminal_err: TextIO | None = None  # and the user's stderr


def echo(text: str = "", err: bool = False) -> None:
    """One line for the user: to the terminal (stderr for errors), whatever the libraries' output is sent to."""
    stream = (_terminal_err or sys.stderr) if err else (_terminal or sys.stdout)
    stream.write(f"{text}\n")
    stream.flush()


def terminal() -> TextIO:
    """The user's terminal (the real stdout while ``quiet_console`` is on)."""
    return _terminal or sys.stdout


@contextlib.contextmanager
def expecting_rows(total: int | None) -> Any:
    """While the block runs, progress lines count towards ``total`` rows (a stage knows its input's size from the
    markers of what it reads; Ray Data does not, once rows are filtered or mapped)."""
    global _expected_rows
    before, _expected_rows = _expected_rows, total
    try:
        yield
    finally:
        _expected_rows = before


class _ProgressLines(logging.Handler):
    """Turns Ray Data's periodic progress report ("Total Progress: 40/64") into one line with rate and ETA.

    The total is the stage's own count when it gave one (``expecting_rows``): Ray Data's is an estimate, and for a
    pass over several engines' rows it has said 16 of 288. The rate is that of rows since the first came out, and
    there is no ETA until more have: an engine's start (~30 s here, minutes for a 7B model) is not a rate of work,
    and counted in, it made "1/576 rows, ETA 11612s" out of a pass that ended 8 s later."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        super().__init__(logging.INFO)
        self.clock = clock
        self.started: dict[str, float] = {}
        self.first_rows: dict[str, tuple[float, int]] = {}  # dataset: (when rows first came out, how many)
        self.dataset = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if found := re.search(r"Running Dataset: (\S+)", message):
            self.dataset = found.group(1)
            self.started.setdefault(self.dataset, self.clock())
        elif found := re.match(r"Total Progress: (\d+)/(\d+|\?)", message):
            now, done, total = self.clock(), int(found.group(1)), found.group(2)
            if _expected_rows is not None:
                total = str(_expected_rows)
            seconds = now - self.started.get(self.dataset, now)
            if not done and seconds < 1:  # a dataset just started: the line would say nothing yet
                return
            line = f"  ... {done}/{total} rows" if total != "?" else f"  ... {done} rows so far"
            if done:
                since, before = self.first_rows.setdefault(self.dataset, (now, done))
                if done > before and now > since:
                    rate = (done - before) / (now - since)
                    line += f", {rate:.1f} rows/s"
                    if total != "?" and int(total) > done:
                        line += f", ETA {(int(total) - done) / rate:.0f}s"
            echo(line + f" ({seconds:.0f}s)")


class _Echo(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        echo(self.format(record), err=record.levelno >= logging.WARNING)


def log_path_for(run_dir: Path | None, command: str) -> Path:
    """Where a command's library output goes: beside the run (``RUN_DIR/logs/``), else in the user's cache
    (``$ZEPHYR_RAY_CACHE``, else ``~/.cache/zephyr-ray``)."""
    if run_dir is not None:
        return Path(run_dir) / "logs" / f"{command}.log"
    from .train.loop import build_cache_dir  # the project's one per-user cache directory

    return build_cache_dir() / "logs" / f"{command}.log"


def quiet_console(log_path: Path, verbose: bool = False) -> Path | None:
    """Send every library's output to ``log_path`` for the rest of this process (see the module's docstring);
    with ``verbose``, only set up our own log lines. Returns the log file, or None when nothing changed."""
    global _terminal, _terminal_err
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    ours = logging.getLogger("zephyr_ray")
    ours.setLevel(logging.INFO)
    if verbose or not owns_process:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return None
    if _terminal is not None:  # already on (the demo's chat): one log for the whole command
        return None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    _terminal_err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    log = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    sys.stdout = sys.stderr = log
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = logging.StreamHandler(log)
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the log, not the terminal
    to_terminal = _Echo(logging.INFO)
    to_terminal.setFormatter(logging.Formatter("%(message)s"))
    ours.addHandler(to_terminal)  # and on to the root's file handler too
    _report_ray_data_progress()
    sys.excepthook = _excepthook(log_path)
    sys.unraisablehook = _unraisable
    return log_path


def _report_ray_data_progress() -> None:
    """Ray Data reports progress to its logger every few seconds when stdout is not a terminal (it no longer is):
    every PROGRESS_INTERVAL_S seconds (or the user's own ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL``), one line on
    the user's terminal. Ray Data reads that variable when it is imported; it is imported here only if it already
    was (importing it takes over a second, which commands that never touch Ray Data need not pay)."""
    interval = int(os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(PROGRESS_INTERVAL_S)))
    reporter = sys.modules.get(_RAY_DATA_PROGRESS)
    if reporter is not None and hasattr(reporter, "LoggingExecutionProgressManager"):
        reporter.LoggingExecutionProgressManager.LOG_REPORT_INTERVAL_SEC = interval
    progress = logging.getLogger(_RAY_DATA_PROGRESS)
    if not any(isinstance(h, _ProgressLines) for h in progress.handlers):
        progress.addHandler(_ProgressLines())


def _excepthook(log_path: Path) -> Any:
    """A crash still reaches the user: one line on the terminal, the traceback in the log."""
    original = sys.__excepthook__

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        original(kind, error, trace)  # into the log
        if not issubclass(kind, KeyboardInterrupt):
            echo(f"error: {kind.__name__}: {error} (traceback in {log_path})", err=True)

    return hook


def _unraisable(info: Any) -> None:
    """Exceptions in ``__del__`` at interpreter exit (vLLM's engine clients do this): into the log."""
    logging.getLogger("zephyr_ray.console").debug("ignored in %r: %r", info.object, info.exc_value)
