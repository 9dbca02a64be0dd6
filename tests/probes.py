"""The suite's probe scripts: each starts a local Ray of its own (fake GPUs, two nodes) in a subprocess and prints
one JSON line of facts for its test module.

They spend most of their time starting processes, so the session runs them one after another in a background
thread beside the CLI runs and the in-process tests, at a lower priority (conftest: queued with the session's first
test; their modules run last and read their results). Run alone, a probe module starts its probe itself."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SEVEN_B = str(TESTS.parent / "jobs" / "configs" / "alpaca_llama2_7b.yaml")
# workers of a probe's Ray import its helpers from tests/ (they inherit the probe's environment)
TESTS_ON_PATH = {"PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}


@dataclass(frozen=True)
class Probe:
    script: str
    args: tuple[str, ...]
    tag: str  # names its Ray temp dir
    timeout: int
    env: dict = field(default_factory=dict)
    output_dir: bool = False  # the probe's first argument is a fresh folder


# in the order the session queues them: the quickest first; last the one with the most processes of its own, which
# keeps both cores busy once the in-process tests are done
PROBES = {
    "multinode": Probe("multinode_probe.py", (), "nodes", 600, output_dir=True),
    "eval_placement": Probe("eval_placement_probe.py", (SEVEN_B, "8"), "evgpu", 600, TESTS_ON_PATH),
    "gpu_placement": Probe("placement_probe.py", (SEVEN_B, "64"), "gpus", 600),
    "finetune_placement": Probe("finetune_placement_probe.py", (SEVEN_B,), "ftgpus", 600, TESTS_ON_PATH),
}
# the test modules that read each probe (run last in a session, see conftest.pytest_collection_modifyitems)
MODULES = {
    "test_finetune_placement": "finetune_placement",
    "test_gpu_placement": "gpu_placement",
    "test_evaluation_placement": "eval_placement",
    "test_shared_output_dir": "multinode",
}

_lock = threading.Lock()
_futures: dict[str, Future] = {}
_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gfr-probe")


def run(name: str) -> dict:
    from conftest import run_probe

    probe = PROBES[name]
    args = probe.args
    scratch = tempfile.mkdtemp(prefix=f"gfr-{probe.tag}-out-") if probe.output_dir else None
    try:
        if scratch:
            args = (str(Path(scratch) / "out"), *args)
        return run_probe(
            TESTS / probe.script, *args, tag=probe.tag, timeout=probe.timeout, env=probe.env, low_priority=True
        )
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def start(names) -> None:
    """Queue these probes on the background thread (each once per session), in PROBES' order."""
    with _lock:
        for name in sorted(names, key=list(PROBES).index):
            if name not in _futures:
                _futures[name] = _pool.submit(run, name)


def result(name: str) -> dict:
    """The probe's facts: from the background run, or run now if the session never queued it."""
    start([name])
    return _futures[name].result()


def stop() -> None:
    """At the session's end: drop the probes not yet started, kill the one still running (an interrupted session)
    and wait for its thread."""
    from conftest import stop_background_probes

    with _lock:
        for future in _futures.values():
            future.cancel()
    stop_background_probes()
    _pool.shutdown(wait=True)
