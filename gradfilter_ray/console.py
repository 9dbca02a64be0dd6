"""What a run prints: its own lines on stdout (a line per stage start and end, progress, the closing summary) and,
at the default `ray.log_level` (WARNING), none of Ray's or the libraries' own chatter. `--verbose` (or
`ray.log_level: INFO`/`DEBUG`) leaves every process as Ray and the libraries set it up. docs/console.md.

Noise with a switch at its source is turned off there: `runtime.init_kwargs` (the token-auth notice, Ray Train's
preemption watcher), `runtime.train_logging` (Ray Train's own reports), `QUIET_ENV` below. What has no switch is
dropped here, each by name, in the driver and (as Ray's `worker_process_setup_hook`) in every Ray worker process.
This module imports nothing but the standard library: every worker process imports it before its first task.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

QUIET_LEVELS = ("WARNING", "ERROR")

QUIET_ENV = {
    # transformers' "Loading weights" and "Writing model shards" bars: one per model load, in every worker.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # Ray Data's INFO lines inside workers ("Dataset ... execution finished" from every ensemble member's read);
    # the driver's Ray Data logger follows ray.log_level (runtime.configure_data_context).
    "RAY_DATA_LOG_LEVEL": "WARNING",
}

# Ray Train's PlacementGroupCleaner, a detached actor beside every Train controller, asks the state API once a
# second whether the controller still lives. The state API needs the dashboard, which the embedded Ray leaves off
# (runtime.init_kwargs), so each ask logs a warning; and where more than one Ray runs on the machine its address
# lookup raises and kills the cleaner's thread with a traceback, dashboard or not. On the embedded Ray the cleaner
# has nothing to clean (the whole Ray ends with the driver), and Ray has no switch for it: both are dropped.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
PLACEMENT_GROUP_CLEANER_THREAD = "PlacementGroupCleanerMonitor"
# Ray Data's notes about its own progress display ("Progress bars disabled ...", "Progress will be logged because
# stdout is a non-interactive terminal"): the ensemble turns its members' bars off on purpose (each would be relayed
# on its own), and the run prints its own progress.
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
# Ray Train's workers log "Reporting training result N: TrainingReport(...)" for every report through a logger named
# after its source file, not under `ray.train`, so Ray Train's own log level (runtime.train_logging) misses it.
TRAIN_REPORT_LOGGER_FILE = ("train", "v2", "_internal", "execution", "context.py")
# Deprecations between the libraries, with no switch: peft reads transformers' `is_gradient_checkpointing`, DeepSpeed
# calls torch's `all_gather_into_tensor`, Ray Train's DatasetManager sets Ray Data's `exclude_resources`.
LIBRARY_DEPRECATIONS = (
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),
    (r"`ExecutionOptions\.exclude_resources` is deprecated", DeprecationWarning),
)

WORKER_SETUP_HOOK = f"{__name__}.quiet_process"


def is_quiet(log_level: str) -> bool:
    return log_level in QUIET_LEVELS


def quiet_process() -> None:
    """Drop, in this process, the lines a user can do nothing about (each named above). The driver calls it before
    Ray starts (the embedded Ray's processes inherit its environment); Ray calls it in every worker process."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in (PLACEMENT_GROUP_CLEANER_LOGGER, RAY_DATA_PROGRESS_LOGGER):
        logging.getLogger(name).setLevel(logging.ERROR)
    ray = importlib.util.find_spec("ray")  # finds, without importing (the driver has not imported ray yet)
    for folder in (ray.submodule_search_locations or []) if ray else []:
        logging.getLogger(os.path.join(folder, *TRAIN_REPORT_LOGGER_FILE)).setLevel(logging.WARNING)
    for message, category in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not getattr(threading.excepthook, "gfr_quiet", False):
        threading.excepthook = _without_cleaner_thread_deaths(threading.excepthook)


def _without_cleaner_thread_deaths(report):
    def excepthook(args: threading.ExceptHookArgs) -> None:
        if args.thread is None or args.thread.name != PLACEMENT_GROUP_CLEANER_THREAD:
            report(args)

    excepthook.gfr_quiet = True  # type: ignore[attr-defined]
    return excepthook


class Console:
    """The run's own lines, on stdout (the stream is looked up at each write: test capture swaps it). On a terminal
    one progress line is redrawn in place and cleared before the next line; elsewhere every progress line is a line
    of its own. Safe to call from several threads (the ensemble's progress comes from a polling thread)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._redrawn = False  # a progress line is on screen without its newline
        self.prefix = ""  # before every line (`prefixed`)

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def is_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def say(self, line: str) -> None:
        with self._lock:
            self._write(("\r\x1b[K" if self._redrawn else "") + self.prefix + line + "\n")
            self._redrawn = False

    def redraw(self, line: str) -> None:
        """A progress line: redrawn in place on a terminal (until the next line), else a line of its own."""
        if not self.is_terminal():
            self.say(line)
            return
        with self._lock:
            self._write("\r\x1b[K" + self.prefix + line)
            self._redrawn = True

    def keep_line(self) -> None:
        """Leave a redrawn progress line on screen as it stands and go to the next line (before an error is
        printed, so it starts a line of its own)."""
        with self._lock:
            if self._redrawn:
                self._write("\n")
                self._redrawn = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


CONSOLE = Console()


def say(line: str) -> None:
    """One line of the run's own output (a stage's start or end, a note), after any progress line on screen."""
    CONSOLE.say(line)


@contextmanager
def prefixed(prefix: str) -> Iterator[None]:
    """Every line of the run's console within the block starts with `prefix` (the audit's inner stages, whose own
    lines and progress lines name their stage only, read "[audit] [ensemble] ...")."""
    outer = CONSOLE.prefix
    CONSOLE.prefix = outer + prefix
    try:
        yield
    finally:
        CONSOLE.prefix = outer


# Ray Data passes every actor pool's constructor arguments through the object store and makes its actors
# restartable (a killed extraction actor restarts and redoes its shard), so the driver's core worker logs this from
# C++ once per pool; nothing this tool passes can avoid it, and Ray's one switch for it (RAY_BACKEND_LOG_LEVEL)
# also silences every other C++ error and empties Ray's log files. It is dropped from the driver's stderr alone.
NATIVE_STDERR_NOISE = (
    rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\([^']*\)' and ID: '[0-9a-f]+' has constructor "
    rb"arguments in the object store and max_restarts > 0",
)
# The filter is a process of its own, so that it drains everything the driver wrote even when the driver dies; it
# ignores the signals a terminal or a job runner sends the whole process group and ends when the last writer closes.
_STDERR_FILTER = """
import re, signal, sys
for name in ("SIGINT", "SIGTERM", "SIGHUP"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
noise = [re.compile(p.encode()) for p in sys.argv[1:]]
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not any(p.search(line) for p in noise):
        out.write(line)
        out.flush()
"""


def filter_native_stderr() -> subprocess.Popen | None:
    """Route this process's file descriptor 2 (Python's and C++'s stderr alike) through a filter that drops the lines
    of NATIVE_STDERR_NOISE and passes every other byte on unchanged. Only for a process that owns its stderr (the
    `gradfilter-ray` program, not a library caller). The filter process, or None where it cannot be set up."""
    if os.name != "posix":
        return None
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    original = os.dup(2)
    patterns = [p.decode() for p in NATIVE_STDERR_NOISE]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-u", "-c", _STDERR_FILTER, *patterns], stdin=read_end, stdout=original
        )
        os.dup2(write_end, 2)
    except OSError:
        for fd in (read_end, write_end, original):
            os.close(fd)
        return None
    for fd in (read_end, write_end):
        os.close(fd)
    atexit.register(_drain_filter, proc, original)
    return proc


def _drain_filter(proc: subprocess.Popen, original: int) -> None:
    """At exit, give fd 2 back to where it pointed and wait for the filter to pass on the last lines, so that the
    shell's next prompt (or the next line a script appends to the same log) comes after them."""
    try:
        sys.stderr.flush()
        os.dup2(original, 2)
        proc.wait(timeout=5)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
