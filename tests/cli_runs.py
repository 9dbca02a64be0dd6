"""The suite's `gradfilter-ray run` subprocesses on the tiny GPT-2 config, each with its own embedded Ray on its own
RAY_TMPDIR (so the leak guard and the tests can find every process of it by that folder).

Two runs of one config serve every test that needs a finished pipeline (conftest's `reference_run` and
`faulted_run`, started together in the background early in the session, see conftest's `_cli_runs`):

- the reference run: uninterrupted, with canary secrets in its environment (the security test scans everything it
  wrote, printed and logged);
- the faulted run: rank 0 of the ensemble dies after its epoch-1 checkpoint (Ray Train restarts the group), then
  the driver's whole process group is SIGKILLed while an extraction actor is held in its second shard (the first
  committed); the same command resumes it, computing only the other shards, and in the resumed run the extraction
  actor is SIGKILLed in its second shard.

The reproducibility test compares the two (same config and seed, separate processes), and the fault tests compare
the faulted run's adapters and gradients with the reference's (a fault-free computation of the same config).
The faults are injected through `gradfilter_ray.faults` with the handler in tests/fault_handlers.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import fault_handlers
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import yield_to_the_session

from gradfilter_ray import pipeline
from gradfilter_ray.config import load
from gradfilter_ray.driver_claim import CLAIM_FILE
from gradfilter_ray.rundir import SCRATCH, RunDir

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny_gpt2.yaml"
CHAT_DEMO = "jobs/configs/chat_demo.yaml"  # the multi-turn demo: `make run CONFIG=jobs/configs/chat_demo.yaml`
ROWS = 16
# shard_rows=4 cuts the 16 rows into 4 extraction shards, so "mid-stream" has a before and an after;
# finetune.scorers=[] stops `run` after the report (fine-tuning has nothing to train). The reference run then runs
# `gradfilter-ray audit` on the same run directory (its 16 rows all sampled, 3 planted), as a user would.
TINY_RUN = (
    f"data.limit={ROWS}",
    "ensemble.members=2",
    "gradients.shard_rows=4",
    "selection.ratios=[0.25, 0.5]",
    "ray.progress_bars=false",
    "finetune.scorers=[]",
)
# Canary values in the reference run's environment: none may appear in anything the run writes, prints or logs.
CANARY_SECRETS = {
    "OPENAI_API_KEY": "sk-gfrcanary-3b9f0c1e7a5d4f2b",
    "HF_TOKEN": "hf_gfrcanaryQ8ZK2mW7xP4vL9rT",
    "HUGGING_FACE_HUB_TOKEN": "hf_gfrcanaryHUB5n1c8d2",
    "AWS_SECRET_ACCESS_KEY": "gfrcanary/AWS+secret/9X7y5",
    "WANDB_API_KEY": "gfrcanarywandb0123456789abcdef",
}
RUN_TIMEOUT_S = 900
# The multi-turn chat demo end to end on an object store (test_cli_e2e.py): one small fine-tuning run and a tiny
# evaluation, so every stage runs for real, through the chat template, in a couple of minutes. (The Alpaca path
# goes through the CLI in the tiny runs, and through fine-tuning and evaluation in test_finetune_evaluation_stages.)
S3_DEMO_ROWS, S3_DEMO_MEMBERS = 20, 2
S3_DEMO = (
    f"data.limit={S3_DEMO_ROWS}",
    "audit.enabled=false",  # the tiny runs audit end to end (an audit is an ensemble more: not on the critical path)
    f"ensemble.members={S3_DEMO_MEMBERS}",
    "selection.ratios=[0.05, 0.1, 0.15]",
    "ray.progress_bars=false",
    "finetune.scorers=[gsnr]",
    "finetune.ratios=[0.15]",
    "finetune.epochs=2",  # one checkpoint, at epoch 1's end: the ranks upload their shards to the store
    "evaluation.test_sets=[vicuna]",
    "evaluation.max_prompts_per_set=2",
    "evaluation.max_new_tokens=8",
    "evaluation.heldout_limit=8",
)

# Left in the run directory after the kill, as a killed driver can leave them: a partial extraction file in the
# config's extraction folder (a write task that finished before the kill; Ray's own file names never start with
# "stale") holding an id no input has, and a scratch folder of a stage in flight. The resumed run must remove both.
STALE_GRADIENTS = "stale-part-of-the-killed-run.parquet"  # in `extraction_folder`
STALE_SCRATCH = f"{SCRATCH}/data-deadbeef/normalized/part-0.parquet"


def set_args(*overrides: str) -> list[str]:
    """CLI arguments for config overrides: ["--set", o1, "--set", o2, ...]."""
    return [arg for override in overrides for arg in ("--set", override)]


def tiny_cfg(out: Path, *extra: str):
    return load(TINY, [f"output_dir={out}", *TINY_RUN, *extra])


def extraction_folder(out: Path) -> Path:
    """The tiny run's extraction folder, `gradients/<its stage key>/` (written there before its record maps it)."""
    return out / RunDir.gradients_unit(pipeline.stage_key("gradients", tiny_cfg(out)))


def cli_args(out: Path, verb: str = "run") -> list[str]:
    return [
        sys.executable,
        "-m",
        "gradfilter_ray",
        verb,
        "--config",
        str(TINY),
        *set_args(f"output_dir={out}", *TINY_RUN),
    ]


def ray_tmpdir(tag: str) -> str:
    """A fresh Ray temp dir: short, since Ray's socket paths under it must fit in 108 bytes."""
    return tempfile.mkdtemp(prefix=f"gfr-{tag}-", dir="/tmp")


def cli_env(ray_tmp: str, **extra: str) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp}
    for name in [k for k in env if k.startswith("GFR_FAULT")] + ["RAY_ADDRESS"]:
        env.pop(name, None)
    return {**env, **extra}


class Aborted(RuntimeError):
    """The session is ending (or failed) while this pipeline still ran."""


def start_cli(out: Path, env: dict, log: Path, args: list[str] | None = None, err: Path | None = None):
    """The CLI (`run` on the tiny config unless `args`) in its own session (so the test can kill its whole process
    group), stdout to `log` and stderr to `err` (or `log` too), at the background's priority
    (conftest.yield_to_the_session)."""
    with log.open("w") as out_fh, (err or Path(os.devnull)).open("w") as err_fh:
        proc = subprocess.Popen(
            args or cli_args(out),
            cwd=REPO,
            env=env,
            stdout=out_fh,
            stderr=err_fh if err else subprocess.STDOUT,
            start_new_session=True,
        )
    yield_to_the_session(proc.pid)
    return proc


def wait_exit(proc: subprocess.Popen, timeout: float, abort: threading.Event) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if abort.is_set():
            raise Aborted("aborted")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the CLI (pid {proc.pid}) ran longer than {timeout} s")
        time.sleep(0.2)
    return proc.returncode


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of a process started in a session of its own (a CLI run, a probe: only processes
    this test session started), if it still runs."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path, abort: threading.Event):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if abort.is_set():
            raise Aborted(what)
        if proc.poll() is not None:
            raise AssertionError(f"CLI exited (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-4000:]}")


def processes_of(ray_tmp: str) -> list:
    """Live processes of the Ray on this temp dir: a CLI a test started with RAY_TMPDIR=ray_tmp and every Ray
    process it spawned, and nothing else on the machine. Matched by environment (the driver and its workers inherit
    RAY_TMPDIR), command line (gcs_server, raylet, ...) or an open file under ray_tmp (the dashboard and runtime-env
    agents run with a scrubbed environment and a `ray::` title: only their log files under the session dir tell)."""
    from leak_guard import processes_in, register_ray_tmp

    register_ray_tmp(ray_tmp)
    return [proc for proc, _, _ in processes_in([ray_tmp])]


def stop_processes_of(ray_tmp: str, wait_s: float = 20) -> tuple[list, list]:
    """Give the processes of that Ray wait_s to exit by themselves, then SIGKILL the rest by pid (never a broad
    kill: the machine is shared). Returns (processes that exited by themselves, processes that were killed)."""
    procs = processes_of(ray_tmp)
    gone, alive = psutil.wait_procs(procs, timeout=wait_s)
    # Look again after each kill: a process started after the first look (a worker its raylet was spawning) is
    # just as much ours.
    for _ in range(5):
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        known = {p.pid for p in gone + alive}
        late = [p for p in processes_of(ray_tmp) if p.pid not in known]
        if not late:
            break
        late_gone, late_alive = psutil.wait_procs(late, timeout=min(wait_s, 5))
        gone, alive = gone + late_gone, alive + late_alive
    return gone, alive


def describe(proc) -> str:
    try:
        return (" ".join(proc.cmdline()) or proc.name())[:60]
    except psutil.Error:
        return str(proc.pid)


def reap(ray_tmp: str, wait_s: float) -> tuple[list[str], list[str]]:
    """Give the processes of that Ray wait_s to exit by themselves, then SIGKILL the rest by pid.
    Returns (what exited by itself, what had to be killed)."""
    names = {p.pid: describe(p) for p in processes_of(ray_tmp)}
    gone, alive = stop_processes_of(ray_tmp, wait_s)
    return sorted(names.get(p.pid, str(p.pid)) for p in gone), sorted(names.get(p.pid, str(p.pid)) for p in alive)


def int_lines(path: Path) -> list[tuple[int, ...]]:
    """A fault handler log ("rank start_epoch pid" or "pid call" lines) as tuples of ints."""
    if not path.exists():
        return []
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines() if line.strip()]


def held_actor(folder: Path) -> int | None:
    """pid of the extraction actor the fault handler holds in its second shard (None until one is held)."""
    text = (folder / "held").read_text().strip() if (folder / "held").exists() else ""
    return int(text) if text else None


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@dataclass
class Pipeline:
    """One background CLI pipeline: what it found, and the Ray temp dirs to remove at the end of the session."""

    base: Path
    abort: threading.Event
    ray_tmps: list[str] = field(default_factory=list)

    def ray_tmp(self, tag: str) -> str:
        self.ray_tmps.append(ray_tmpdir(tag))
        return self.ray_tmps[-1]

    def cleanup(self) -> None:
        for ray_tmp in self.ray_tmps:
            reap(ray_tmp, wait_s=5)
            shutil.rmtree(ray_tmp, ignore_errors=True)


def run_reference(p: Pipeline) -> dict:
    """The uninterrupted run, with canary secrets in its environment, then its audit. Its Ray temp dir is kept (the
    security test scans Ray's session files for the secrets) until the end of the session."""
    out, log = p.base / "run", p.base / "run.log"
    ray_tmp = p.ray_tmp("ref")
    proc = start_cli(out, cli_env(ray_tmp, **CANARY_SECRETS), log)
    try:
        rc = wait_exit(proc, RUN_TIMEOUT_S, p.abort)
    finally:
        kill_group(proc)
    left = reap(ray_tmp, wait_s=30)[1]
    facts = {"out": out, "rc": rc, "pid": proc.pid, "log": log.read_text(), "ray_tmp": ray_tmp, "left_after": left}
    if rc != 0:
        return facts
    audit_log, audit_tmp = p.base / "audit.log", p.ray_tmp("aud")
    audit = start_cli(out, cli_env(audit_tmp, **CANARY_SECRETS), audit_log, args=cli_args(out, "audit"))
    try:
        facts["audit_rc"] = wait_exit(audit, RUN_TIMEOUT_S, p.abort)
    finally:
        kill_group(audit)
    facts["audit_log"], facts["audit_left_after"] = audit_log.read_text(), reap(audit_tmp, wait_s=30)[1]
    return facts


def run_faulted(p: Pipeline) -> dict:
    out = p.base / "run"
    first_dir, second_dir = p.base / "faults1", p.base / "faults2"
    first_dir.mkdir()
    second_dir.mkdir()
    log1, log2 = p.base / "first.log", p.base / "second.log"
    ray_tmp1, ray_tmp2 = p.ray_tmp("k1"), p.ray_tmp("k2")
    # The runs' own TMPDIR (Ray workers inherit it): what the ensemble workers and extraction actors leave in their
    # temp folder, killed or not, can be checked there (the machine's /tmp is shared).
    tmp = Path(p.ray_tmp("t"))
    facts: dict = {"out": out, "first_dir": first_dir, "second_dir": second_dir, "tmpdir": tmp}

    # Run 1: rank 0 of the ensemble dies after epoch 1 (restarted by Ray Train); then, while the extraction actor is
    # held in its second shard, the whole CLI process group is SIGKILLed.
    env1 = cli_env(ray_tmp1, TMPDIR=str(tmp), **fault_handlers.fault_env(first_dir, crash_after_epoch=1))
    first = start_cli(out, env1, log1)
    try:
        actor = wait_for(
            lambda: held_actor(first_dir), RUN_TIMEOUT_S, "run 1's actor in shard 2", first, log1, p.abort
        )
        facts["manifest_at_kill"] = RunDir(str(out)).read_manifest()
        at_kill = processes_of(ray_tmp1)
        facts["ray_processes_at_kill"] = len(at_kill)
        facts["actor_is_ours_at_kill"] = actor in {proc.pid for proc in at_kill}
    finally:
        kill_group(first)
    facts["first_rc"] = first.returncode
    facts["first_pid"] = first.pid
    facts["first_log"] = log1.read_text()
    facts["manifest_after_kill"] = RunDir(str(out)).read_manifest()
    facts["claim_after_kill"] = json.loads((out / CLAIM_FILE).read_text())
    facts["exited_by_themselves"], facts["killed_by_pid"] = reap(ray_tmp1, wait_s=45)
    facts["left_after_kill"] = [describe(proc) for proc in processes_of(ray_tmp1)]
    facts["gradients_after_kill"] = files_under(extraction_folder(out))  # no process of run 1 writes any more
    stale = pa.table({"id": pa.array([-1], pa.int64())})
    for where in (extraction_folder(out) / STALE_GRADIENTS, out / STALE_SCRATCH):
        where.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(stale, where)

    # Run 2: the same command; its extraction actor is SIGKILLed by the test in the middle of its second shard.
    second = start_cli(out, cli_env(ray_tmp2, TMPDIR=str(tmp), **fault_handlers.fault_env(second_dir)), log2)
    try:
        victim = wait_for(
            lambda: held_actor(second_dir), RUN_TIMEOUT_S, "run 2's actor in shard 2", second, log2, p.abort
        )
        [actor] = [proc for proc in processes_of(ray_tmp2) if proc.pid == victim] or [None]
        assert actor is not None, f"the held actor {victim} is not a process of our Ray"
        actor.kill()  # by its psutil handle: never another process that took the pid over
        psutil.wait_procs([actor], timeout=30)
        (second_dir / "killed").write_text(str(victim))
        facts["victim"] = victim
        facts["second_rc"] = wait_exit(second, RUN_TIMEOUT_S, p.abort)
    finally:
        kill_group(second)
    facts["second_log"] = log2.read_text()
    facts["gradients_after_second"] = files_under(extraction_folder(out))
    facts["gradients_folders"] = sorted(p.name for p in (out / "gradients").iterdir())
    facts["left_after_second"] = reap(ray_tmp2, wait_s=30)[1]
    facts["tmpdir_after"] = files_under(tmp) + sorted(str(d.relative_to(tmp)) for d in tmp.rglob("*") if d.is_dir())
    return facts


def run_s3_demo(p: Pipeline, s3_server) -> dict:
    """The chat demo config through the CLI (as `make run` does it) on s3:// on the session's local S3 server, which
    counts the bytes each process moves; then a second driver on the same output_dir, then `compare`."""
    uri = s3_server.uri("demo")
    run = [sys.executable, "-m", "gradfilter_ray", "run", "--config", CHAT_DEMO]
    args = [*run, *set_args(f"output_dir={uri}", *S3_DEMO)]
    facts: dict = {"uri": uri, "args": args}

    def drive(name: str, args: list[str], ray_tmp: str) -> dict:
        out, err = p.base / f"{name}.out", p.base / f"{name}.err"
        proc = start_cli(Path(), cli_env(ray_tmp), out, args=args, err=err)
        try:
            rc = wait_exit(proc, RUN_TIMEOUT_S, p.abort)
        finally:
            kill_group(proc)
        # Ray's session folders under the run's temp dir: what tells whether the CLI started a Ray at all
        sessions = sorted(d.name for d in Path(ray_tmp).rglob("session_*") if d.is_dir())
        stdout, stderr = out.read_text(), err.read_text()
        return {"rc": rc, "pid": proc.pid, "stdout": stdout, "stderr": stderr, "ray_sessions": sessions}

    seen = len(s3_server.requests)
    s3_server.bytes.reset()
    ray_tmp = p.ray_tmp("s3")
    facts["first"] = drive("first", args, ray_tmp)
    facts["requests"] = s3_server.requests[seen:]
    facts["bytes_by_pid"] = {pid: sum(c) for pid, c in s3_server.bytes.by_pid.items()}
    facts["bytes_by_pid_and_path"] = dict(s3_server.bytes.by_pid_and_path)
    facts["left_after_first"] = reap(ray_tmp, wait_s=30)[1]
    if facts["first"]["rc"] != 0:
        return facts
    # A second driver (a new pod) on the same output_dir.
    facts["again"] = drive("again", args, p.ray_tmp("s3b"))
    # `compare` rebuilds the comparison of the same config from the store (no Ray).
    s3_server.bytes.reset()
    compare = [sys.executable, "-m", "gradfilter_ray", "compare", "--config", CHAT_DEMO]
    compare += set_args(f"output_dir={uri}", *S3_DEMO)
    facts["compare"] = drive("compare", compare, p.ray_tmp("s3c"))
    facts["compare"]["bytes"] = sum(s3_server.bytes.by_pid.get(facts["compare"]["pid"], [0, 0]))
    return facts


# name of the fixture -> (what runs it, the fixtures it needs besides its Pipeline), in the order the runs finish
# (the session runs their readers in that order: conftest.pytest_collection_modifyitems)
PIPELINES = {
    "reference_run": (run_reference, ()),
    "faulted_run": (run_faulted, ()),
    "s3_demo_run": (run_s3_demo, ("s3_server",)),
}
