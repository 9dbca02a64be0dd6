"""Progress a person can read: rows done of total, rate and time left, printed at most every few seconds.

Ray Data's bars count blocks, so one big input file shows 0/1 for hours; the ensemble members and the extraction
report rows instead, through one `RowProgress` each (members print from their workers, Ray relays the lines).
"""

from __future__ import annotations

import time
from collections.abc import Callable


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
    """Counts rows done and prints a progress line when `every_s` seconds have passed since the last one (and at
    the end). `clock` and `emit` are injectable for tests."""

    def __init__(
        self,
        label: str,
        total: int,
        every_s: float = 10.0,
        unit: str = "rows",
        emit: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
        already_done: int = 0,
    ) -> None:
        self.label, self.total, self.every_s, self.unit = label, total, every_s, unit
        self.emit, self.clock = emit, clock
        self.base = already_done  # rows finished by an earlier, interrupted run: not part of this run's rate
        self.done = already_done
        self.started = clock()
        self.last_emit = self.started

    def advance(self, rows: int) -> None:
        self.done += rows
        now = self.clock()
        if self.done >= self.total or now - self.last_emit >= self.every_s:
            self.last_emit = now
            self.emit(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.started
        fresh = self.done - self.base
        line = progress_line(self.label, fresh, self.total - self.base, elapsed, self.unit)
        if self.base:
            line += f" (+{self.base:,} done before resuming: {self.done:,}/{self.total:,})"
        return line
