"""Fault injection on the tiny GPT-2 pipeline, every fault a real process death, every result compared with a
fault-free computation of the same config:

- an ensemble worker (rank 0) dies after its epoch-1 checkpoint: Ray Train restarts the group from it and the
  adapters equal a clean, uninterrupted training of the same members (same seeds) done in-process without Ray;
- the driver is SIGKILLed (its whole process group) while an extraction actor is mid-stream: extraction is
  recorded "running", never done; the same command takes over the dead driver's claim, resumes, skips the finished
  stages, re-runs extraction replacing whatever the dead run left in gradients/, removes left-over scratch folders
  and finishes; the dead driver's Ray processes are found by their RAY_TMPDIR and are gone (or killed by pid);
- in the resumed run an extraction actor is SIGKILLed mid-stream: Ray Data restarts it, every id appears once and
  the values equal the extractor run in-process on the same batches.

One module fixture runs the CLI twice as subprocesses (each with its own embedded Ray on its own RAY_TMPDIR) with
the test hooks of `ensemble.stage` and `gradients.stage` switched on through environment variables; the tests then
judge what happened. No session Ray is needed.

Cheaper faults on a synthetic run directory (no model; score and select run as Ray tasks on the session's Ray):
a config change re-runs exactly the stages it affects; NaN/inf norms and losses go through score -> select -> report
flagged, counted and never selected.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import processes_of, stop_processes_of, write_canonical_data

from gradfilter_ray import pipeline
from gradfilter_ray.config import load
from gradfilter_ray.driver_claim import CLAIM_FILE
from gradfilter_ray.ensemble import stage as ensemble_stage
from gradfilter_ray.finetune import stage as finetune_stage
from gradfilter_ray.gradients import stage as gradients_stage
from gradfilter_ray.rundir import SCRATCH, RunDir
from gradfilter_ray.scoring.scorers import GSNR_SCORERS

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny_gpt2.yaml"
ROWS = 16
# length_bucket_rows=6 cuts the 16 rows into 3 batches, so "mid-stream" has a before and an after.
# finetune.scorers=[] keeps `run` cheap now that fine-tuning is a stage (it has nothing to train).
OVERRIDES = [
    f"data.limit={ROWS}",
    "ensemble.members=2",
    "gradients.length_bucket_rows=6",
    "ray.progress_bars=false",
    "finetune.scorers=[]",
]
GRADIENT_COLUMNS = ("sq_norm_early", "sq_norm_late", "loss_early", "loss_late", "ifd_loss_cond", "ifd_loss_uncond")
FINISHED = ("data", "ensemble", "gradients", "scoring", "selection", "report")


def tiny_cfg(out: Path):
    return load(TINY, [f"output_dir={out}", *OVERRIDES])


def cli_args(out: Path) -> list[str]:
    args = [sys.executable, "-m", "gradfilter_ray", "run", "--config", str(TINY), "--set", f"output_dir={out}"]
    for item in OVERRIDES:
        args += ["--set", item]
    return args


def cli_env(ray_tmp: str, **hooks: str) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp}
    for name in (
        "RAY_ADDRESS",
        gradients_stage.TEST_HOOK_ENV,
        ensemble_stage.TEST_HOOK_ENV,
        ensemble_stage.TEST_CRASH_ENV,
    ):
        env.pop(name, None)
    return {**env, **hooks}


# ----- processes -----


def start_cli(out: Path, env: dict, log: Path) -> subprocess.Popen:
    """The CLI run in its own session (so the test can kill its whole process group), output to `log`."""
    with log.open("w") as fh:
        return subprocess.Popen(
            cli_args(out), cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )


def describe(proc: psutil.Process) -> str:
    try:
        return (" ".join(proc.cmdline()) or proc.name())[:60]
    except psutil.Error:
        return str(proc.pid)


def reap(ray_tmp: str, wait_s: float) -> tuple[list[str], list[str]]:
    """Give the processes of that Ray wait_s to exit by themselves, then SIGKILL the rest by pid.
    Returns (what exited by itself, what we had to kill)."""
    names = {p.pid: describe(p) for p in processes_of(ray_tmp)}
    gone, alive = stop_processes_of(ray_tmp, wait_s)
    return sorted(names.get(p.pid, str(p.pid)) for p in gone), sorted(names.get(p.pid, str(p.pid)) for p in alive)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"CLI exited (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-4000:]}")


# ----- hook files -----


def hook_lines(path: Path) -> list[tuple[int, ...]]:
    if not path.exists():
        return []
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines() if line.strip()]


def actor_in_second_batch(hook: Path) -> int | None:
    """pid of the extraction actor that is blocked in its second batch (see gradients.stage.TEST_HOOK_ENV)."""
    return next((pid for pid, call in hook_lines(hook / "calls.log") if call == 2), None)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# Left in the run directory after the kill, as a killed driver can leave them: a partial extraction file (a write
# task that finished before the kill; Ray's own file names never start with "stale") holding an id no input has,
# and a scratch folder of a stage in flight. The resumed run must remove both.
STALE_GRADIENTS = "gradients/stale-part-of-the-killed-run.parquet"
STALE_SCRATCH = f"{SCRATCH}/ingest-deadbeef/normalized/part-0.parquet"


# ----- the faulted runs -----


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    out = base / "run"
    hooks = {name: base / name for name in ("ensemble_hook", "extract_hook_1", "extract_hook_2")}
    for folder in hooks.values():
        folder.mkdir()
    ray_tmp1 = tempfile.mkdtemp(prefix="gfr-k1-", dir="/tmp")  # short: Ray's socket paths must fit in 108 bytes
    ray_tmp2 = tempfile.mkdtemp(prefix="gfr-k2-", dir="/tmp")
    log1, log2 = base / "first.log", base / "second.log"
    facts: dict = {"out": out, "hooks": hooks}
    try:
        # Run 1: rank 0 of the ensemble dies after epoch 1 (restarted by Ray Train); then, while the extraction actor
        # is blocked in its second batch, the whole CLI process group is SIGKILLed.
        env1 = cli_env(
            ray_tmp1,
            **{
                ensemble_stage.TEST_HOOK_ENV: str(hooks["ensemble_hook"]),
                ensemble_stage.TEST_CRASH_ENV: "1",
                gradients_stage.TEST_HOOK_ENV: str(hooks["extract_hook_1"]),
            },
        )
        first = start_cli(out, env1, log1)
        try:
            actor = wait_for(
                lambda: actor_in_second_batch(hooks["extract_hook_1"]), 600, "run 1's actor in batch 2", first, log1
            )
            facts["manifest_at_kill"] = RunDir(str(out)).read_manifest()
            at_kill = processes_of(ray_tmp1)
            facts["ray_processes_at_kill"] = len(at_kill)
            facts["actor_is_ours_at_kill"] = actor in {p.pid for p in at_kill}
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the CLI's own session: only processes this test started
            first.wait(timeout=60)
        facts["first_rc"] = first.returncode
        facts["first_pid"] = first.pid
        facts["first_log"] = log1.read_text()
        facts["manifest_after_kill"] = RunDir(str(out)).read_manifest()
        facts["claim_after_kill"] = json.loads((out / CLAIM_FILE).read_text())
        facts["exited_by_themselves"], facts["killed_by_pid"] = reap(ray_tmp1, wait_s=45)
        facts["left_after_kill"] = [describe(p) for p in processes_of(ray_tmp1)]
        facts["gradients_after_kill"] = files_under(out / "gradients")  # no process of run 1 writes any more
        stale = pa.table({"id": pa.array([-1], pa.int64())})
        for rel in (STALE_GRADIENTS, STALE_SCRATCH):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(stale, out / rel)

        # Run 2: the same command; its extraction actor is SIGKILLed by the test in the middle of its second batch.
        env2 = cli_env(ray_tmp2, **{gradients_stage.TEST_HOOK_ENV: str(hooks["extract_hook_2"])})
        second = start_cli(out, env2, log2)
        try:
            victim = wait_for(
                lambda: actor_in_second_batch(hooks["extract_hook_2"]), 300, "run 2's actor in batch 2", second, log2
            )
            assert victim in {p.pid for p in processes_of(ray_tmp2)}, "the actor is not a process of our Ray"
            os.kill(victim, signal.SIGKILL)
            psutil.wait_procs([psutil.Process(victim)], timeout=30)
            (hooks["extract_hook_2"] / "killed").write_text(str(victim))
            facts["victim"] = victim
            second.wait(timeout=600)
        finally:
            if second.poll() is None:
                os.killpg(second.pid, signal.SIGKILL)
                second.wait(timeout=60)
        facts["second_rc"] = second.returncode
        facts["second_log"] = log2.read_text()
        facts["gradients_after_second"] = files_under(out / "gradients")
        facts["left_after_second"] = reap(ray_tmp2, wait_s=30)[1]
        yield facts
    finally:
        for ray_tmp in (ray_tmp1, ray_tmp2):
            reap(ray_tmp, wait_s=5)
            shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def finished(faulted):
    """The resumed run, which must have finished: the checks on its outputs fail with its log otherwise."""
    if faulted["second_rc"] != 0:
        pytest.fail("the resumed run failed:\n" + faulted["second_log"][-4000:])
    return faulted


# ----- fault-free references, computed in-process without Ray -----


def clean_adapters(cfg, rundir: RunDir) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Every member trained without interruption (train_member_worker's steps, minus Ray): (member, epoch) -> LoRA."""
    from peft import get_peft_model_state_dict

    from gradfilter_ray.data.tokenized import tokenize_table
    from gradfilter_ray.ensemble.loop import TokenRows, train_member
    from gradfilter_ray.ensemble.lora import attach_lora
    from gradfilter_ray.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.proxy.model)
    tokens = tokenize_table(pq.read_table(rundir.data), tokenizer, cfg.proxy)
    tokens = tokens.filter(pa.compute.greater(tokens["n_response_tokens"], 0))
    rows = TokenRows.from_columns(
        tokens["id"].to_pylist(), tokens["input_ids"].to_numpy(zero_copy_only=False), tokens["label_start"].to_pylist()
    )
    adapters = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.ensemble.cpus_per_member)))  # as the worker does
    try:
        for m in range(cfg.ensemble.members):
            seed = cfg.ensemble.seed + m
            model = attach_lora(load_causal_lm(cfg.proxy.model, torch.float32, "cpu"), cfg.ensemble, seed=seed)

            def keep(epoch, model, optimizer, losses, m=m):
                adapters[m, epoch] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

            train_member(model, rows, cfg.ensemble, seed, torch.device("cpu"), tokenizer.pad_token_id, keep)
    finally:
        torch.set_num_threads(threads)
    return adapters


def clean_gradients(cfg, rundir: RunDir, scratch: Path) -> pa.Table:
    """The extraction actor's class run in-process on the same batches Ray Data gives it. Its temporary files go
    to `scratch` (which must be empty afterwards: a killed actor runs no finalizer)."""
    ens = cfg.ensemble
    adapters = gradients_stage.adapter_locations(rundir.ensemble, ens.members, ens.early_epoch, ens.late_epoch)
    threads, tempdir = torch.get_num_threads(), tempfile.tempdir
    scratch.mkdir()
    try:
        tempfile.tempdir = str(scratch)
        extractor = gradients_stage.NormExtractor(asdict(cfg.proxy), asdict(cfg.gradients), ens.members, adapters)
        tempfile.tempdir = tempdir
        assert not list(scratch.glob("gfr-adapters-*")), "the extractor left its adapter files behind"
        data = pq.read_table(rundir.data, columns=["id", "instruction", "input", "output"])
        step = cfg.gradients.length_bucket_rows
        parts = [extractor(data.slice(i, step)) for i in range(0, data.num_rows, step)]
    finally:
        torch.set_num_threads(threads)
        tempfile.tempdir = tempdir
    return pa.concat_tables(parts).sort_by("id")


# ----- the tests -----


@pytest.mark.slow
def test_driver_killed_mid_extraction_resumes_and_skips_finished_stages(faulted):
    out = faulted["out"]
    cfg = tiny_cfg(out)
    # The kill landed mid-extraction: ingest and ensemble recorded done, extract recorded "running" (begun, so not
    # done), the actor (a process of this run's Ray) blocked in its second batch: one batch done, one in flight,
    # one queued.
    at_kill = faulted["manifest_at_kill"]["stages"]
    assert at_kill["data"]["status"] == at_kill["ensemble"]["status"] == "done"
    assert at_kill["gradients"] == {"status": "running", "key": pipeline.stage_key("gradients", cfg)}
    assert faulted["actor_is_ours_at_kill"] and faulted["ray_processes_at_kill"] >= 4
    assert faulted["first_rc"] == -signal.SIGKILL
    # Whatever the killed run wrote to gradients/ in place, extraction is not done: only the record written last by
    # a finished stage says done, and the kill came before it.
    assert faulted["manifest_after_kill"]["stages"]["gradients"]["status"] == "running"
    print(f"gradients/ after the kill: {faulted['gradients_after_kill']}")
    # The killed driver's claim on the run directory was left behind (and the resumed run below took it over).
    assert faulted["claim_after_kill"]["pid"] == faulted["first_pid"]
    # Nothing of the killed driver's Ray survives the cleanup: what exited by itself and what we killed by pid.
    print(f"killed driver's Ray: exited by themselves {faulted['exited_by_themselves']}")
    print(f"killed driver's Ray: killed by pid after 45 s {faulted['killed_by_pid']}")
    assert faulted["left_after_kill"] == [], faulted["left_after_kill"]

    log = faulted["second_log"]
    assert faulted["second_rc"] == 0, log[-4000:]
    assert f"[data] already done (key {pipeline.stage_key('data', cfg)})" in log
    assert f"[ensemble] already done (key {pipeline.stage_key('ensemble', cfg)})" in log
    assert "[gradients] running" in log and "[gradients] already done" not in log
    assert faulted["left_after_second"] == []  # a clean exit shuts its Ray down

    rundir = RunDir(str(out))
    manifest = rundir.read_manifest()
    for stage in ("data", "ensemble"):  # the records are the first run's: skipped, not re-run
        assert manifest["stages"][stage] == at_kill[stage]
    for stage in FINISHED:
        assert rundir.stage_done(stage, pipeline.stage_key(stage, cfg)), stage
    # The re-run of extraction replaced every file the killed run left in gradients/ (none survives by name, the
    # planted stale part included); the dead run's scratch folder is gone and no new one is left.
    after = faulted["gradients_after_second"]
    assert STALE_GRADIENTS.split("/", 1)[1] not in after and after
    assert not set(faulted["gradients_after_kill"]) & set(after), faulted["gradients_after_kill"]
    assert files_under(out / SCRATCH) == []
    assert not (out / CLAIM_FILE).exists()  # a clean exit releases its claim

    data_ids = np.sort(pq.read_table(rundir.data, columns=["id"])["id"].to_numpy())
    grads = pq.read_table(rundir.gradients).sort_by("id")
    np.testing.assert_array_equal(grads["id"].to_numpy(), data_ids)
    assert manifest["stages"]["gradients"]["rows"] == len(data_ids) == ROWS
    scores = pq.read_table(out / "scoring" / "scores.parquet", columns=["id"])
    assert sorted(scores["id"].to_pylist()) == data_ids.tolist()
    for name, counts in manifest["stages"]["selection"]["selections"].items():
        lines = (out / "selection" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == counts["selected"], name
        assert all({"instruction", "output"} <= set(json.loads(line)) for line in lines)
    assert (out / "report" / "index.html").stat().st_size > 0


@pytest.mark.slow
def test_extraction_actor_killed_mid_stream_is_restarted_and_output_matches(finished, tmp_path):
    out, hook, victim = finished["out"], finished["hooks"]["extract_hook_2"], finished["victim"]
    calls = hook_lines(hook / "calls.log")
    assert [call for pid, call in calls if pid == victim] == [1, 2]  # it died inside its second batch
    restarted = {pid for pid, _ in calls} - {victim}
    assert len(restarted) == 1, calls  # a new actor process took over and processed the batches again
    assert len([1 for pid, _ in calls if pid in restarted]) >= 2

    rundir = RunDir(str(out))
    cfg = tiny_cfg(out)
    got = pq.read_table(rundir.gradients).sort_by("id")
    expected = clean_gradients(cfg, rundir, tmp_path / "scratch")
    np.testing.assert_array_equal(got["id"].to_numpy(), expected["id"].to_numpy())  # every id exactly once
    for column in GRADIENT_COLUMNS:
        np.testing.assert_allclose(
            np.array(got[column].to_pylist(), dtype=float),
            np.array(expected[column].to_pylist(), dtype=float),
            rtol=1e-5,
            atol=1e-10,
            equal_nan=True,
            err_msg=column,
        )
    assert (np.array(got["sq_norm_late"].to_pylist()) > 0).all()


@pytest.mark.slow
def test_ensemble_worker_crash_restarts_from_checkpoint_and_matches_clean_run(faulted):
    from safetensors.torch import load_file

    out, hook = faulted["out"], faulted["hooks"]["ensemble_hook"]
    cfg = tiny_cfg(out)
    assert cfg.ensemble.max_failures >= 1
    assert (hook / "crashed").read_text().startswith("epoch 1 ")  # rank 0 really died after epoch 1
    starts = hook_lines(hook / "starts.log")
    assert sorted((rank, epoch) for rank, epoch, _ in starts) == [(0, 1), (0, 2), (1, 1), (1, 2)], starts
    first_pids = {pid for _, epoch, pid in starts if epoch == 1}
    # the restarted group is new processes that began at epoch 2: it resumed from the epoch-1 checkpoint
    assert all(pid not in first_pids for _, epoch, pid in starts if epoch == 2)
    record = faulted["manifest_at_kill"]["stages"]["ensemble"]
    assert record["rows_trained"] == ROWS and record["members"] == 2

    rundir = RunDir(str(out))
    clean = clean_adapters(cfg, rundir)
    for m in range(cfg.ensemble.members):
        for e in range(1, cfg.ensemble.epochs + 1):
            got = load_file(str(rundir.member_epoch(m, e) / "adapter_model.safetensors"))
            assert got.keys() == clean[m, e].keys()
            for key in got:
                torch.testing.assert_close(got[key], clean[m, e][key], rtol=1e-5, atol=1e-6, msg=f"m{m} e{e} {key}")
    trainer = ensemble_stage.trainer_name(pipeline.stage_key("ensemble", cfg))
    assert not (rundir.ensemble_train_state / trainer).exists()
    # the dead worker's private folder was removed by its successor; the finished workers removed their own
    crashed_pid = (hook / "crashed").read_text().split()[-1]
    work = Path(tempfile.gettempdir()) / ensemble_stage.WORK_ROOT
    assert not list(work.glob(f"{crashed_pid}-*"))
    assert not [p for p in work.glob("*") if int(p.name.split("-")[0]) in {pid for _, _, pid in starts}]


def test_a_new_member_worker_removes_the_folders_of_dead_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / ensemble_stage.WORK_ROOT
    (root / f"{dead.pid}-member0-x" / "member_0").mkdir(parents=True)
    (root / f"{os.getppid()}-member1-y").mkdir()  # a live process's folder stays
    mine = ensemble_stage.member_workdir(3)
    assert sorted(p.name for p in root.iterdir()) == sorted([f"{os.getppid()}-member1-y", mine.name])
    assert mine.name.startswith(f"{os.getpid()}-member3-")


# ----- cheap faults on a synthetic run directory (no model, no Ray) -----

N_SYNTH, M_SYNTH = 60, 2


def synthetic_rundir(root: Path, cfg, bad: dict[int, dict] | None = None) -> tuple[RunDir, np.ndarray]:
    """data/ and gradients/ for N_SYNTH rows as the real stages write them, ingest/ensemble/extract recorded done
    for `cfg`; `bad` maps a row index to column overrides (the injected faults)."""
    rng = np.random.default_rng(1)
    rundir = RunDir(str(root))
    rundir.gradients.make_dir()
    ids = np.arange(N_SYNTH, dtype=np.int64) * 3 + 5
    write_canonical_data(Path(rundir.data), ids, source_rows=np.arange(N_SYNTH))
    early = rng.uniform(1.0, 4.0, (N_SYNTH, M_SYNTH))
    rows = {
        "sq_norm_early": early,
        "sq_norm_late": early * rng.uniform(0.2, 0.9, (N_SYNTH, M_SYNTH)),
        "loss_early": rng.uniform(1.0, 3.0, (N_SYNTH, M_SYNTH)),
        "loss_late": rng.uniform(0.5, 2.0, (N_SYNTH, M_SYNTH)),
        "n_response_tokens": rng.integers(3, 40, N_SYNTH).astype(np.int32),
        "ifd_loss_cond": rng.uniform(1.0, 2.0, N_SYNTH),
        "ifd_loss_uncond": rng.uniform(2.0, 3.0, N_SYNTH),  # IFD < 1: every healthy row is IFD-eligible
    }
    for row, overrides in (bad or {}).items():
        for column, value in overrides.items():
            rows[column][row] = value
    rows["n_tokens"] = rows["n_response_tokens"] + 10
    table = pa.table(
        {
            "id": ids,
            **{
                c: pa.array(list(rows[c]), pa.list_(pa.float64()))
                for c in ("sq_norm_early", "sq_norm_late", "loss_early", "loss_late")
            },
            **{c: rows[c] for c in ("n_response_tokens", "n_tokens", "ifd_loss_cond", "ifd_loss_uncond")},
        }
    ).cast(gradients_stage.GRADIENT_SCHEMA)
    pq.write_table(table.slice(0, N_SYNTH // 2), rundir.gradients / "part-0.parquet")
    pq.write_table(table.slice(N_SYNTH // 2), rundir.gradients / "part-1.parquet")
    done = {"status": "done", "rows_in": N_SYNTH, "rows_kept": N_SYNTH, "rows_rejected": 0}
    for stage in ("data", "ensemble", "gradients"):
        rundir.record_stage(stage, {**done, "key": pipeline.stage_key(stage, cfg)})
    return rundir, ids


def downstream(stages: set[str]) -> set[str]:
    """The stages plus everything that reads them, directly or not."""
    found = set(stages)
    while True:
        more = {name for name, st in pipeline.STAGES.items() if set(st.reads) & found} - found
        if not more:
            return found
        found |= more


def test_stage_keys_change_exactly_for_the_stages_a_config_field_affects(tmp_path):
    base = tiny_cfg(tmp_path / "run")

    def invalidated(override: str) -> set[str]:
        cfg = load(TINY, [f"output_dir={tmp_path / 'run'}", *OVERRIDES, override])
        return {s for s in pipeline.STAGES if pipeline.stage_key(s, cfg) != pipeline.stage_key(s, base)}

    directly = {
        "scoring.eps=0.001": {"scoring"},
        "scoring.random_seed=7": {"scoring"},
        "selection.ratios=[0.2]": {"selection"},
        "gradients.precision=float64": {"gradients"},
        "proxy.max_length=96": {"ensemble", "gradients"},
        "ensemble.lora_rank=2": {"ensemble"},
        "ensemble.seed=1": {"ensemble"},
        "data.limit=10": {"data"},
        "data.max_field_chars=100": {"data"},
        # knobs that change how fast, not what: nothing is re-run
        "gradients.batch_size=4": set(),
        "gradients.num_actors=2": set(),
        "gradients.length_bucket_rows=64": set(),
        "gradients.torch_threads=2": set(),
        "ray.num_cpus=1": set(),
        "ray.progress_bars=true": set(),
        f"output_dir={tmp_path / 'moved'}": set(),  # a run directory can move
    }
    for override, stages in directly.items():
        assert invalidated(override) == downstream(stages), override
    core = {"data", "ensemble", "gradients", "scoring", "selection", "report"}
    assert invalidated("scoring.eps=0.001") & core == {"scoring", "selection", "report"}


def test_raising_max_failures_does_not_invalidate_the_ensemble(tmp_path):
    base = tiny_cfg(tmp_path / "run")
    more = load(TINY, [f"output_dir={tmp_path / 'run'}", *OVERRIDES, "ensemble.max_failures=5"])
    key = pipeline.stage_key("ensemble", base)
    assert pipeline.stage_key("ensemble", more) == key
    # Ray Train's run is named from the key alone, so the resumed trainer finds the old run's checkpoints
    assert ensemble_stage.trainer_name(pipeline.stage_key("ensemble", more)) == ensemble_stage.trainer_name(key)
    target_more = load(TINY, [f"output_dir={tmp_path / 'run'}", *OVERRIDES, "finetune.max_failures=5"])
    target_key = pipeline.stage_key("finetune", base)
    assert pipeline.stage_key("finetune", target_more) == target_key
    assert finetune_stage.trainer_name(pipeline.stage_key("finetune", target_more), "gsnr_0.1") == (
        finetune_stage.trainer_name(target_key, "gsnr_0.1")
    )


@pytest.mark.ray
def test_changing_scoring_eps_reruns_score_select_report_only(ray_cluster, tmp_path):
    root = tmp_path / "run"
    cfg = load(TINY, [f"output_dir={root}", *OVERRIDES, "selection.ratios=[0.1, 0.3]"])
    rundir, _ = synthetic_rundir(root, cfg)
    for stage in FINISHED:
        pipeline.run_stage(stage, cfg, rundir, log=lambda _: None)
    before = rundir.read_manifest()["stages"]
    gsnr_before = pq.read_table(root / "scoring" / "scores.parquet", columns=["gsnr"])["gsnr"].to_numpy()

    changed = load(TINY, [f"output_dir={root}", *OVERRIDES, "selection.ratios=[0.1, 0.3]", "scoring.eps=100.0"])
    messages: list[str] = []
    for stage in FINISHED:
        pipeline.run_stage(stage, changed, rundir, log=messages.append)
    skipped = {m.split("]")[0][1:] for m in messages if "already done" in m}
    ran = {m.split("]")[0][1:] for m in messages if "] running" in m}
    assert skipped == {"data", "ensemble", "gradients"} and ran == {"scoring", "selection", "report"}
    after = rundir.read_manifest()["stages"]
    for stage in ("data", "ensemble", "gradients"):
        assert after[stage] == before[stage]
    for stage in ("scoring", "selection", "report"):
        assert after[stage]["key"] != before[stage]["key"]
        assert rundir.stage_done(stage, pipeline.stage_key(stage, changed))
    gsnr_after = pq.read_table(root / "scoring" / "scores.parquet", columns=["gsnr"])["gsnr"].to_numpy()
    assert not np.allclose(gsnr_before, gsnr_after)  # the new eps was really applied

    again: list[str] = []
    for stage in FINISHED:
        pipeline.run_stage(stage, changed, rundir, log=again.append)
    assert all("already done" in m for m in again) and len(again) == len(FINISHED)


@pytest.mark.ray
def test_nan_and_inf_rows_are_flagged_counted_and_never_selected(ray_cluster, tmp_path):
    """Each injected row would top the G-SNR ranking (or IFD's) if its guard failed."""
    huge = [1e6] * M_SYNTH
    bad = {
        0: {"sq_norm_early": huge, "sq_norm_late": [np.nan, 0.0]},  # NaN late norm
        1: {"sq_norm_early": [np.inf, 1e6], "sq_norm_late": [0.0, 0.0]},  # +inf early norm
        2: {"sq_norm_early": huge, "sq_norm_late": [0.0, 0.0], "loss_late": [np.nan, 1.0]},  # NaN loss
        3: {"sq_norm_early": huge, "sq_norm_late": [0.0, 0.0], "loss_early": [np.inf, 1.0]},  # inf loss
        4: {"sq_norm_early": huge, "sq_norm_late": [0.0, -np.inf]},  # -inf late norm
        5: {"sq_norm_early": huge, "sq_norm_late": [-1.0, 0.0]},  # negative squared norm
        6: {"sq_norm_early": [0.0, 0.0], "sq_norm_late": [0.0, 0.0]},  # zero early norm
        7: {"n_response_tokens": 0, "sq_norm_early": huge, "sq_norm_late": [0.0, 0.0]},
        8: {"ifd_loss_cond": np.nan},  # IFD inputs
        9: {"ifd_loss_cond": -np.inf},
        10: {"ifd_loss_uncond": np.inf},
    }
    root = tmp_path / "run"
    cfg = load(TINY, [f"output_dir={root}", *OVERRIDES, "selection.ratios=[0.05, 0.5]"])
    rundir, ids = synthetic_rundir(root, cfg, bad)
    for stage in FINISHED:
        pipeline.run_stage(stage, cfg, rundir, log=lambda _: None)

    scores = pq.read_table(root / "scoring" / "scores.parquet").to_pandas().set_index("id")
    expected = {
        0: "non_finite",
        1: "non_finite",
        2: "non_finite",
        3: "non_finite",
        4: "non_finite",
        5: "invalid_norm",
        6: "zero_early_norm",
        7: "no_response_tokens",
    }
    for row, reason in expected.items():
        assert scores.loc[ids[row], "reason"] == reason, row
        assert np.isnan(scores.loc[ids[row], "gsnr"])  # NaN: not eligible for G-SNR
    for row in (8, 9, 10):
        assert np.isfinite(scores.loc[ids[row], "gsnr"])  # the norms are fine: only IFD excludes the row
        assert np.isnan(scores.loc[ids[row], "ifd"]) and scores.loc[ids[row], "ifd_reason"] == "non_finite"
    healthy = scores.drop(index=ids[list(expected)])
    assert healthy["reason"].isna().all() and np.isfinite(healthy["gsnr"]).all()

    manifest = rundir.read_manifest()["stages"]
    assert manifest["scoring"]["ineligible_by_reason"] == {
        "invalid_norm": 1,
        "no_response_tokens": 1,
        "non_finite": 5,
        "zero_early_norm": 1,
    }
    assert manifest["scoring"]["rows"] == N_SYNTH == manifest["scoring"]["rows_eligible"] + 8

    gsnr_family = [s for s in cfg.scoring.scorers if s in GSNR_SCORERS]
    for scorer in gsnr_family:
        for ratio in cfg.selection.ratios:
            chosen = set(pq.read_table(root / "selection" / f"{scorer}_{ratio:g}.parquet")["id"].to_pylist())
            assert chosen and not chosen & set(ids[list(expected)]), (scorer, ratio)
    for ratio in cfg.selection.ratios:
        chosen = set(pq.read_table(root / "selection" / f"ifd_{ratio:g}.parquet")["id"].to_pylist())
        assert chosen and not chosen & set(ids[[7, 8, 9, 10]]), ratio
    page = (root / "report" / "index.html").read_text()
    assert "non_finite" in page and "zero_early_norm" in page
