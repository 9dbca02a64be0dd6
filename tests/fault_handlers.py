"""The fault tests' handler for `gradfilter_ray.faults.fault_point` (test-only; production code has no test hooks).

A test switches it on in a CLI subprocess's environment with `fault_env(folder, crash_after_epoch=...)`:
GFR_FAULT_HANDLER names `handle` below, PYTHONPATH lets every Ray worker import this module, and GFR_FAULT_DIR is
the folder where the handler leaves its traces (the test reads them) and finds its orders:

- "ensemble.start" (rank, start_epoch, pid): appends "rank start_epoch pid" to `starts.log`;
- "ensemble.epoch_end" (rank, epoch, pid, train_dir): with GFR_FAULT_CRASH_AFTER_EPOCH=e, rank 0 dies (os._exit(1))
  after epoch e, once Ray Train's controller has registered that epoch's checkpoint (it writes
  `checkpoint_manager_snapshot.json` in train_dir), and only once (marker file `crashed`);
- "gradients.shard" (pid, shard, out), the main run's extraction only (the tiny runs also run the audit's, into
  `audit/gradients`): appends "pid call shard" to `calls.log` (call = that actor's shard count); the first
  actor that reaches its second shard takes the marker `held` and waits there (at most HOLD_S) until a file `killed`
  appears, so the test can kill the driver or the actor at a known point mid-stream.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HANDLER_ENV = "GFR_FAULT_HANDLER"
DIR_ENV = "GFR_FAULT_DIR"
CRASH_ENV = "GFR_FAULT_CRASH_AFTER_EPOCH"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train writes it when the controller registers a checkpoint
HOLD_BLOCK = 2
HOLD_S = 120.0
CRASH_WAIT_S = 120.0

_blocks = 0  # shards this process (one extraction actor) has started


def fault_env(folder: Path, crash_after_epoch: int | None = None) -> dict[str, str]:
    """The variables that switch this handler on in a CLI subprocess (and, through it, in every Ray worker)."""
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    env = {HANDLER_ENV: f"{Path(__file__).stem}:handle", DIR_ENV: str(folder), "PYTHONPATH": path}
    if crash_after_epoch is not None:
        env[CRASH_ENV] = str(crash_after_epoch)
    return env


def handle(name: str, **context) -> None:
    folder = os.environ.get(DIR_ENV)
    if not folder:
        return
    folder = Path(folder)
    if name == "ensemble.start":
        _append(folder / "starts.log", f"{context['rank']} {context['start_epoch']} {context['pid']}")
    elif name == "ensemble.epoch_end":
        crash = os.environ.get(CRASH_ENV)
        if crash and context["rank"] == 0 and int(crash) == context["epoch"]:
            _crash_once(folder, context["epoch"], Path(context["train_dir"]) / SNAPSHOT_FILE, context["pid"])
    elif name == "gradients.shard" and Path(context["out"]).parent.name != "audit":
        global _blocks
        _blocks += 1
        _append(folder / "calls.log", f"{context['pid']} {_blocks} {context['shard']}")
        if _blocks == HOLD_BLOCK and _take(folder / "held", str(context["pid"])):
            deadline = time.monotonic() + HOLD_S
            while not (folder / "killed").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def _append(path: Path, line: str) -> None:
    with path.open("a") as fh:  # one short write per line: concurrent workers do not interleave within a line
        fh.write(line + "\n")


def _take(marker: Path, text: str) -> bool:
    """Create `marker` unless it exists (atomically): True for the one process that created it."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return True


def registered_epoch(snapshot: Path) -> int:
    """The epoch of the latest checkpoint Ray Train's controller has registered (0: none yet)."""
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return 0
    return int(latest.get("metrics", {}).get("epoch", 0))


def _crash_once(folder: Path, epoch: int, snapshot: Path, pid: int) -> None:
    if (folder / "crashed").exists():
        return
    deadline = time.monotonic() + CRASH_WAIT_S
    while registered_epoch(snapshot) < epoch and time.monotonic() < deadline:
        time.sleep(0.1)
    (folder / "crashed").write_text(f"epoch {epoch} pid {pid}\n")
    os._exit(1)
