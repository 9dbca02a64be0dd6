"""Opening the Ray session: an embedded local Ray by default, or the cluster named by RAY_ADDRESS.

`ray.init()` with no address attaches silently to any Ray already running on the machine, so the embedded default
passes ``address="local"``. Under ``ray job submit`` RAY_ADDRESS is set and we attach without resource arguments
(passing num_cpus to an existing cluster raises).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from gradfilter_ray.config import RayConfig
from gradfilter_ray.console import WORKER_SETUP_HOOK, is_quiet, quiet_process
from gradfilter_ray.faults import fault_env
from gradfilter_ray.resources import ONE_TASK, Request

TRAIN_TICK_ENV, EMBEDDED_TRAIN_TICK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
# Ray Train starts a PreemptionWatcher actor per worker group to follow node drains (spot preemption); the embedded
# Ray is one node, the driver's own. Its constructor takes the workers' actor handles with max_restarts=-1, which
# Ray's core worker logs as an error ("constructor arguments in the object store"), and each start is a process more.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray's notice that it turned token authentication on for a new local cluster: no action is needed. Its switch,
# RAY_AUTH_MODE=token, only works when set before `import ray` (set later, the driver and the new cluster disagree
# and ray.init fails to authenticate), which a session cannot promise: the notice is dropped instead.
TOKEN_AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
# Where Ray's job manager hands a submitted job's config (its runtime_env included) to the entrypoint.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# The CUDA caching allocator's settings for every worker of the job (extraction and evaluation actors, ensemble and
# fine-tuning workers): expandable segments grow one mapping instead of caching blocks of fixed sizes, so batches of
# changing shapes (token-budget batches, OOM halves) do not leave free memory too fragmented to use. PyTorch reads
# either name (PYTORCH_ALLOC_CONF from 2.10); one the user set, in the driver's environment or the job's
# runtime_env, stands instead, even empty.
ALLOC_CONF_ENV, ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"
ALLOC_CONF_NAMES = (ALLOC_CONF_ENV, "PYTORCH_ALLOC_CONF")


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
    env_vars = dict(fault_env())  # tests only: their fault handler must reach every worker
    env_vars.update(allocator_env())
    runtime_env: dict = {"env_vars": env_vars} if env_vars else {}
    if is_quiet(cfg.log_level) and not _job_sets_setup_hook():
        runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if address == "local":
        # Ray Train's controller looks at its workers every 2 s by default: on the embedded Ray a member's or a small
        # fine-tune's whole fit is a few ticks, so each start, report and end waits out a tick. The processes this
        # session starts inherit the driver's environment; a cluster keeps its own setting.
        os.environ.setdefault(TRAIN_TICK_ENV, EMBEDDED_TRAIN_TICK_S)
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        # Without the dashboard Ray Train's PlacementGroupCleaner cannot reach the state API (console.py drops its
        # warnings). Turning the dashboard on does not cure that where several Rays share the machine (the cleaner's
        # address lookup fails there), and measured on this 2-core machine it buys nothing for its cost: ray.init
        # 2.95 s without, 3.16 s with (mean of 5 each); a small run (tiny config, 16 rows, 2 members) 35-47 s
        # without and 40-41 s with (noise of a shared machine either way); idle memory ~470 vs ~680 MiB.
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
    # Ray Data's second Parquet reader starts a pool of FooterReader actors (up to 32) for every read_parquet and
    # kills them when the listing ends; a kill that meets an actor still starting makes the GCS log "Failed to kill
    # actor" to the console. The first reader uses plain tasks. Measured here (2 cores, one 1,000-row file, three
    # reads): 0.10 s per warm read and 6 worker processes with it, 0.56-0.82 s and 20 processes with the second.
    ctx.use_datasource_v2 = False
    # ray.log_level covers Ray Data's driver-side INFO lines too ("execution finished", "Data sink ... written",
    # and the periodic progress log lines it prints in place of bars when output is not a terminal).
    logging.getLogger("ray.data").setLevel(max(logging.getLogger("ray.data").level, getattr(logging, cfg.log_level)))


def _job_runtime_env() -> dict:
    """The runtime_env `ray job submit` gave the job ({} outside a submitted job)."""
    return json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}


def _job_sets_setup_hook() -> bool:
    """Whether `ray job submit` gave the job a worker_process_setup_hook of its own (Ray refuses two)."""
    return bool(_job_runtime_env().get("worker_process_setup_hook"))


def allocator_env() -> dict[str, str]:
    """The allocator setting ray.init gives the job's workers: the user's own from the driver's environment (passed
    on, so that workers on other nodes get it too), or expandable segments; nothing when the job's runtime_env names
    one (Ray passes that on itself, and refuses a variable that both it and ray.init's name)."""
    job_env = _job_runtime_env().get("env_vars") or {}
    if any(name in job_env for name in ALLOC_CONF_NAMES):
        return {}
    return {name: os.environ[name] for name in ALLOC_CONF_NAMES if name in os.environ} or {ALLOC_CONF_ENV: ALLOC_CONF}


def train_logging(cfg: RayConfig):
    """Ray Train's own log level (its controller's and workers' reports: worker group started, every result
    reported, every checkpoint created) follows ray.log_level."""
    import ray.train

    return ray.train.LoggingConfig(log_level=cfg.log_level)


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Open (or reuse) a Ray session; shut down only what we started. At the default log level the driver and
    every worker drop what a user can do nothing about (console.py)."""
    import ray

    if is_quiet(cfg.log_level):
        quiet_process()
        logging.getLogger(TOKEN_AUTH_NOTICE_LOGGER).setLevel(logging.ERROR)
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


def run_as_task(fn, *args, request: Request = ONE_TASK, max_retries: int = 2):
    """Run `fn(*args)` as one Ray task asking for `request` (`resources.one_task`, what the stage table shows), on a
    worker next to the data rather than on the driver; its result."""
    import ray

    return ray.get(ray.remote(fn).options(**request.remote_args(), max_retries=max_retries).remote(*args))


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
