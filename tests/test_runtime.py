"""`runtime.at_most_in_flight` (the finetune stage's subsets side by side) on a real local Ray with plain tasks:
never more than the width at once, every item in launch order, and a failure cancels the rest and raises."""

from __future__ import annotations

import time

import pytest

from gradfilter_ray.runtime import at_most_in_flight

pytestmark = pytest.mark.ray


@pytest.fixture
def span_task(ray_cluster):
    """A task that sleeps and returns (item, started, ended), or raises; defined here so Ray ships it by value."""
    import ray

    def span(item: int, seconds: float, fail: bool = False) -> tuple[int, float, float]:
        started = time.time()
        time.sleep(seconds)
        if fail:
            raise ValueError(f"item {item} failed")
        return item, started, time.time()

    return ray.remote(span).options(num_cpus=0, max_retries=0)


def test_no_more_than_the_width_run_at_once_and_all_finish(span_task):
    task = span_task
    finished = []
    at_most_in_flight(2, list(range(5)), lambda i: task.remote(i, 0.4), lambda i, r: finished.append(r))
    assert sorted(r[0] for r in finished) == list(range(5))
    edges = sorted([(r[1], 1) for r in finished] + [(r[2], -1) for r in finished])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2  # width 2 kept: two at once, never three
    starts = {r[0]: r[1] for r in finished}
    assert starts[2] >= min(r[2] for r in finished if r[0] < 2) - 0.05  # the third waited for a free slot


def test_a_failure_cancels_the_others_and_raises(span_task):
    import ray

    task = span_task
    finished = []
    with pytest.raises(ray.exceptions.RayTaskError, match="item 0 failed"):
        at_most_in_flight(
            2, [0, 1, 2], lambda i: task.remote(i, 0.1 if i == 0 else 5, fail=i == 0), lambda i, r: finished.append(i)
        )
    assert finished == []  # nothing after the failure was waited for
