"""`runtime.at_most_in_flight` (the finetune stage's subsets side by side) on a real local Ray with plain tasks:
never more than the width at once, and after a failure no new item starts, the running ones finish, then it
raises."""

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


def test_after_a_failure_nothing_new_starts_the_running_finish_and_the_failure_is_raised(span_task):
    """Item 0 fails while item 1 runs: item 1 still finishes (its work is kept), items 2 and 3 never start."""
    import ray

    launched, finished = [], []

    def launch(i):
        launched.append(i)
        return span_task.remote(i, 0.1 if i == 0 else 1.0, fail=i == 0)

    with pytest.raises(ray.exceptions.RayTaskError, match="item 0 failed"):
        at_most_in_flight(2, [0, 1, 2, 3], launch, lambda i, r: finished.append(i))
    assert launched == [0, 1] and finished == [1]
