"""Progress a person can read: rows done of total, rate and time left. On a terminal one line is redrawn in place
(twice a second at most) until the stage's closing line replaces it; elsewhere (a file, a pipe) a line is printed
every 30 s at first, less often as a long stage goes on (at most 5 min apart), as tqdm and Ray Data print lines
where they cannot redraw. The stage's closing line says how it ended, so no progress line repeats it.

Ray Data's bars count blocks, so one big input file shows 0/1 for hours; the stages count rows instead. The
extraction advances its `RowProgress` in the driver as shards finish; the ensemble members train in Ray Train
workers, so they report to a `ProgressBoard` actor, which a driver thread reads (`board_progress`): one line for the
whole ensemble, printed by the driver like every other line of the run, never relayed from a worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from gradfilter_ray.console import CONSOLE, Console

EVERY_S = 30.0  # between progress lines where the output is not a terminal, at first...
EVERY_SHARE = 1 / 6  # ...then this share of the time the stage has run (a line per ~15% of a long stage's time)...
MAX_EVERY_S = 300.0  # ...but never further apart than this
REDRAW_S = 0.5  # between redraws on a terminal


def duration(seconds: float) -> str:
    """12s, 4m05s, 3h12m: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(label: str, done: int, total: int, elapsed_s: float, unit: str = "rows") -> str:
    """'label: 12,288/52,002 rows (23.6%), 41.0 rows/s, 4m51s elapsed, ETA 16m10s'."""
    share = f" ({100.0 * done / total:.1f}%)" if total else ""
    line = f"{label}: {done:,}/{total:,} {unit}{share}"
    if elapsed_s > 0 and done > 0:
        rate = done / elapsed_s
        line += f", {rate:,.1f} {unit}/s, {duration(elapsed_s)} elapsed"
        if done < total:
            line += f", ETA {duration((total - done) / rate)}"
    return line


class RowProgress:
    """Counts rows done and shows a progress line every `every_s` seconds (or `EVERY_SHARE` of the time since the
    start, up to `MAX_EVERY_S`, when that is longer): with `emit`, each line and one at the end go to `emit`;
    without, to `console` (default the run's), as lines, or on a terminal as one line redrawn every `redraw_s`
    seconds (the end included). `clock` is injectable for tests."""

    def __init__(
        self,
        label: str,
        total: int,
        every_s: float = EVERY_S,
        unit: str = "rows",
        emit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        already_done: int = 0,
        console: Console | None = None,
        redraw_s: float = REDRAW_S,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.console = console or CONSOLE
        self.emit = emit
        self.redrawn = emit is None and self.console.is_terminal()
        self.every_s = redraw_s if self.redrawn else every_s
        self.clock = clock
        self.base = already_done  # rows finished by an earlier, interrupted run: not part of this run's rate
        self.done = already_done
        self.shown: int | None = None  # rows done on the last line shown
        self.started = clock()
        self.last_emit = self.started

    def advance(self, rows: int) -> None:
        self.update(self.done + rows)

    def update(self, done: int) -> None:
        """Set the rows done (all of them, those before a resume included)."""
        self.done = done
        now = self.clock()
        finished = done >= self.total
        if finished and (self.shown == done or not (self.emit or self.redrawn)):
            return  # shown already, or printed as lines: the stage's closing line follows
        if finished or now - self.last_emit >= self._interval(now):
            self.last_emit, self.shown = now, done
            self._show(self.line(now))

    def _interval(self, now: float) -> float:
        if self.redrawn:
            return self.every_s
        return min(max(self.every_s, EVERY_SHARE * (now - self.started)), max(self.every_s, MAX_EVERY_S))

    def _show(self, line: str) -> None:
        if self.emit is not None:
            self.emit(line)
        elif self.redrawn:
            self.console.redraw(line)
        else:
            self.console.say(line)

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.started
        fresh = self.done - self.base
        line = progress_line(self.label, fresh, self.total - self.base, elapsed, self.unit)
        if self.base:
            line += f" (+{self.base:,} done before resuming: {self.done:,}/{self.total:,})"
        return line


class ProgressBoard:
    """Rows done, rows to do and rows done before a resume, per reporter (an ensemble member, by rank). Run as a Ray
    actor (`board_progress`): the workers report, the driver reads the sums."""

    def __init__(self) -> None:
        self.by_reporter: dict[int, tuple[int, int, int]] = {}

    def report(self, reporter: int, done: int, total: int, resumed: int) -> None:
        self.by_reporter[reporter] = (done, total, resumed)

    def sums(self) -> tuple[int, int, int]:
        return tuple(sum(values) for values in zip(*self.by_reporter.values(), strict=True)) or (0, 0, 0)


class BoardReporter:
    """A worker's side of a `ProgressBoard`: its rows done, sent (without waiting) at most every `every_s` seconds
    and when it reaches its total. `board` None reports nothing (a trainer built without a board)."""

    def __init__(self, board, reporter: int, total: int, already_done: int = 0, every_s: float = 1.0) -> None:
        self.board, self.reporter, self.total, self.resumed = board, reporter, total, already_done
        self.done, self.every_s, self.last_sent = already_done, every_s, float("-inf")
        self._send()

    def advance(self, rows: int) -> None:
        self.done += rows
        if self.done >= self.total or time.monotonic() - self.last_sent >= self.every_s:
            self._send()

    def _send(self) -> None:
        self.last_sent = time.monotonic()
        if self.board is not None:
            self.board.report.remote(self.reporter, self.done, self.total, self.resumed)


@contextmanager
def board_progress(
    label: str, poll_s: float = 1.0, unit: str = "rows", console: Console | None = None
) -> Iterator[object]:
    """A `ProgressBoard` actor (its handle, for the workers) and a driver thread showing its sums as one progress
    line (a `RowProgress` on `console`); the line starts with the first report (so the rate leaves out the workers'
    start-up), and takes a last reading when the block ends."""
    import ray

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    stop = threading.Event()
    progress: list[RowProgress] = []

    def show() -> None:
        try:
            done, total, resumed = ray.get(board.sums.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - a progress line is never worth failing a stage over; the next poll retries
            return
        if not total:
            return
        if not progress:
            progress.append(RowProgress(label, total, unit=unit, already_done=resumed, console=console))
        progress[0].total, progress[0].base = total, resumed  # members start reporting at different times
        progress[0].update(done)

    def poll() -> None:
        while not stop.wait(poll_s):
            show()

    thread = threading.Thread(target=poll, name="gfr-board-progress", daemon=True)
    thread.start()
    finished = False
    try:
        yield board
        finished = True
    finally:
        stop.set()
        thread.join()
        if finished:
            show()
        ray.kill(board)
