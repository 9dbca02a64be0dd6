"""Progress lines: rows done of total, rate and time left, at most every `every_s`, resumed rows kept apart."""

from __future__ import annotations

from gradfilter_ray.progress import RowProgress, duration, progress_line


def test_durations_read_short():
    assert [duration(s) for s in (0, 12.4, 245, 3600 * 3 + 60 * 12 + 5)] == ["0s", "12s", "4m05s", "3h12m"]


def test_a_line_holds_share_rate_elapsed_and_eta():
    line = progress_line("[gradients] extracted", 12_288, 52_002, 300.0)
    assert line == "[gradients] extracted: 12,288/52,002 rows (23.6%), 41.0 rows/s, 5m00s elapsed, ETA 16m10s"
    assert "ETA" not in progress_line("x", 10, 10, 5.0) and "rows/s" not in progress_line("x", 0, 10, 5.0)


def test_lines_come_at_most_every_interval_and_at_the_end():
    now = [0.0]
    lines: list[str] = []
    progress = RowProgress("m", 100, every_s=10, emit=lines.append, clock=lambda: now[0])
    for t, rows in [(1, 10), (5, 10), (11, 10), (12, 10), (30, 60)]:
        now[0] = t
        progress.advance(rows)
    assert len(lines) == 2  # at 11 s (10 s since the start) and at the end
    assert lines[0].startswith("m: 30/100 rows (30.0%)") and lines[-1].startswith("m: 100/100 rows (100.0%)")


def test_rows_done_before_a_resume_count_in_the_total_but_not_in_the_rate():
    now = [0.0]
    lines: list[str] = []
    progress = RowProgress("g", 100, every_s=0, emit=lines.append, clock=lambda: now[0], already_done=60)
    now[0] = 10.0
    progress.advance(20)
    assert lines == ["g: 20/40 rows (50.0%), 2.0 rows/s, 10s elapsed, ETA 10s (+60 done before resuming: 80/100)"]
