"""Opening the Ray session: an embedded local Ray by default, or the cluster named by RAY_ADDRESS.

`ray.init()` with no address attaches silently to any Ray already running on the machine, so the embedded default
passes ``address="local"``. Under ``ray job submit`` RAY_ADDRESS is set and we attach without resource arguments
(passing num_cpus to an existing cluster raises).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from gradfilter_ray.config import RayConfig
from gradfilter_ray.faults import fault_env

TRAIN_TICK_ENV, EMBEDDED_TRAIN_TICK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def resolve_address(cfg: RayConfig) -> str:
    return cfg.address or os.environ.get("RAY_ADDRESS") or "local"


def init_kwargs(cfg: RayConfig) -> dict:
    address = resolve_address(cfg)
    kwargs: dict = {
        "address": address,
        "logging_level": getattr(logging, cfg.log_level),
        "log_to_driver": True,
        "configure_logging": True,
    }
    if fault_env():  # tests only: their fault handler must reach every worker
        kwargs["runtime_env"] = {"env_vars": fault_env()}
    if address == "local":
        # Ray Train's controller looks at its workers every 2 s by default: on the embedded Ray a member's or a small
        # fine-tune's whole fit is a few ticks, so each start, report and end waits out a tick. The processes this
        # session starts inherit the driver's environment; a cluster keeps its own setting.
        os.environ.setdefault(TRAIN_TICK_ENV, EMBEDDED_TRAIN_TICK_S)
        kwargs["include_dashboard"] = False
        if cfg.num_cpus is not None:
            kwargs["num_cpus"] = cfg.num_cpus
        if cfg.num_gpus is not None:
            kwargs["num_gpus"] = cfg.num_gpus
    return kwargs


def configure_data_context(cfg: RayConfig) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    # Row order inside our outputs is not meaningful (every row carries its id), so let Ray stream freely.
    ctx.execution_options.preserve_order = False
    # ray.log_level covers Ray Data's driver-side INFO lines too ("execution finished", "Data sink ... written",
    # and the periodic progress log lines it prints in place of bars when output is not a terminal).
    logging.getLogger("ray.data").setLevel(max(logging.getLogger("ray.data").level, getattr(logging, cfg.log_level)))


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Open (or reuse) a Ray session; shut down only what we started."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(**init_kwargs(cfg))
        started = True
    configure_data_context(cfg)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def cluster_summary() -> dict:
    import ray

    res = ray.cluster_resources()
    return {"cpus": res.get("CPU", 0.0), "gpus": res.get("GPU", 0.0), "nodes": len(ray.nodes())}


# Parquet reads and writes are light next to the model work they feed; at Ray Data's default of 1 CPU a read or
# write task can starve beside an actor pool that holds the node's CPUs (a deadlock on a 2-core machine).
IO_REMOTE_ARGS = {"num_cpus": 0.25}


def run_as_task(fn, *args, num_cpus: float = 1, max_retries: int = 2):
    """Run `fn(*args)` as one Ray task (on a worker, next to the data rather than on the driver); its result."""
    import ray

    return ray.get(ray.remote(fn).options(num_cpus=num_cpus, max_retries=max_retries).remote(*args))


def at_most_in_flight(width: int, items: list, launch, on_done=lambda item, result: None) -> None:
    """`launch(item)` -> an ObjectRef, for each item in order, with at most `width` unfinished at once; `on_done(item,
    result)` as each finishes. After a failure nothing new is launched, the items in flight finish (hours of GPU
    work each: cancelling them would throw it away), and then the first failure is raised."""
    import ray

    pending, in_flight, failure = list(items), {}, None
    while (pending and failure is None) or in_flight:
        while pending and failure is None and len(in_flight) < width:
            item = pending.pop(0)
            in_flight[launch(item)] = item
        done, _ = ray.wait(list(in_flight), num_returns=1)
        item = in_flight.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as exc:
            failure = failure or exc
            continue
        on_done(item, result)
    if failure is not None:
        raise failure


@contextmanager
def sigint_restored() -> Iterator[None]:
    """Ray Train's fit() leaves a SIGINT handler that holds the TrainController's handle: the controller (~0.4 GB)
    then lives until ray.shutdown (and is orphaned if the driver is killed), and Ctrl-C is swallowed twice. Put the
    previous handler back once fit() returns."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
