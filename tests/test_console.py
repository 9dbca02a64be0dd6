"""What a run prints (docs/console.md). The session's reference run (tests/cli_runs.py: `run`, then `audit`, each
with stdout and stderr in one file, as `make run > log 2>&1` keeps them) holds the run's own lines and nothing else,
and its closing summary comes last. The progress printer redraws one line on a terminal and prints whole lines
elsewhere; the ensemble's members report to a board the driver prints from; the quieting drops exactly the lines it
names; `--verbose` gives Ray's own logs back."""

from __future__ import annotations

import copy
import io
import json
import re
import subprocess
import sys
import tempfile
import textwrap

import psutil
import pytest
from cli_runs import TINY, tiny_cfg

from gradfilter_ray import cli
from gradfilter_ray.config import RayConfig
from gradfilter_ray.console import WORKER_SETUP_HOOK, Console
from gradfilter_ray.pipeline import CLOSING_FIGURES, STAGES, closing_line, stage_key
from gradfilter_ray.progress import BoardReporter, RowProgress, board_progress
from gradfilter_ray.report import summarize_run, summary_lines
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import init_kwargs

STAGE = r"(\[audit\] )?\[(" + "|".join(STAGES) + r")\] "
# The run's own lines: every stage line starts with its stage's tag (the audit's inner stages with "[audit] " too);
# the notes and warnings of the driver's checks say so first.
OWN_LINES = [STAGE + r"\S.*", r"(note|warning): \S.*"]


def stray_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if not any(re.fullmatch(p, line) for p in OWN_LINES)]


@pytest.mark.slow
def test_a_run_prints_its_own_lines_only_and_its_summary_last(reference_run):
    assert reference_run["rc"] == 0 and reference_run["audit_rc"] == 0, reference_run["log"][-4000:]
    out = reference_run["out"]
    run = RunDir(str(out))
    cfg = tiny_cfg(out)
    keys = {name: stage_key(name, cfg) for name in STAGES}
    manifest = run.read_manifest()
    before_audit = copy.deepcopy(manifest)
    before_audit["stages"].pop("audit")  # `run` ended before `gradfilter-ray audit` added its record
    for log, at_end in ((reference_run["log"], before_audit), (reference_run["audit_log"], manifest)):
        assert "\r" not in log and "\x1b" not in log  # nothing redrawn or coloured where the output is a file
        lines = log.splitlines()
        assert len(lines) <= 60, log  # the demo's whole run, fine-tuning and evaluation included, prints 58
        summary = summary_lines(summarize_run(at_end, str(run.root), keys))
        # The summary is the last block, whole (its scorer rows in the order of the manifest as it was then).
        assert lines[-len(summary)] == summary[0] == f"run directory: {run.root}", log[-3000:]
        assert sorted(lines[-len(summary) :]) == sorted(summary), log[-3000:]
        assert stray_lines(lines[: -len(summary)]) == [], log
    lines = reference_run["log"].splitlines()
    for name in ("data", "tokens", "ensemble", "gradients", "scoring", "selection", "report"):
        assert sum(line.startswith(f"[{name}] running (") for line in lines) == 1, name
        assert sum(line.startswith(f"[{name}] done in ") for line in lines) == 1, name


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def rows_at(progress: RowProgress, now: list[float], steps: list[tuple[float, int]]) -> None:
    for t, rows in steps:
        now[0] = t
        progress.advance(rows)


def test_on_a_terminal_one_progress_line_is_redrawn_in_place_until_the_stage_line_replaces_it():
    screen, now = Terminal(), [0.0]
    console = Console(screen)
    progress = RowProgress("[x] trained", 100, console=console, clock=lambda: now[0], redraw_s=0.5)
    rows_at(progress, now, [(0.1, 10), (0.6, 10), (0.8, 10), (2.0, 70)])
    progress.update(100)  # the end seen twice (a last poll after the stage): drawn once
    console.say("[x] done in 2.0s")
    assert screen.getvalue().split("\r\x1b[K") == [
        "",
        "[x] trained: 20/100 rows (20.0%), 33.3 rows/s, 1s elapsed, ETA 2s",  # 0.1 s had no redraw: too soon
        "[x] trained: 100/100 rows (100.0%), 50.0 rows/s, 2s elapsed",
        "[x] done in 2.0s\n",
    ]


def test_a_line_said_while_progress_is_on_screen_clears_it_first():
    screen, now = Terminal(), [0.0]
    console = Console(screen)
    progress = RowProgress("[x] trained", 100, console=console, clock=lambda: now[0], redraw_s=0.5)
    rows_at(progress, now, [(1.0, 20)])
    console.say("warning: something to act on")
    assert screen.getvalue().endswith("ETA 4s\r\x1b[Kwarning: something to act on\n")
    rows_at(progress, now, [(2.0, 20)])
    console.keep_line()  # a stage failed: its error starts a line of its own, under the last progress line
    assert screen.getvalue().endswith("\r\x1b[K[x] trained: 40/100 rows (40.0%), 20.0 rows/s, 2s elapsed, ETA 3s\n")


class Timed(io.StringIO):
    """A file that notes the clock's time of every line written to it."""

    def __init__(self, now: list[float]) -> None:
        super().__init__()
        self.now, self.times = now, []

    def write(self, text: str) -> int:
        self.times += [self.now[0]] * text.count("\n")
        return super().write(text)


def test_elsewhere_progress_comes_in_whole_lines_further_apart_as_a_long_stage_goes_on():
    now = [0.0]
    out = Timed(now)
    progress = RowProgress("[x] trained", 3600, every_s=30, console=Console(out), clock=lambda: now[0])
    rows_at(progress, now, [(t, 1) for t in range(1, 3601)])
    gaps = [b - a for a, b in zip([0.0, *out.times], out.times)]
    assert gaps[:6] == [30] * 6  # every 30 s for the first 3 minutes...
    assert gaps == sorted(gaps) and 30 < gaps[8] < 300 and gaps[-1] == 300  # ...then wider, at most 5 min apart
    assert out.times[-1] < 3600  # no line at the end: the stage's closing line follows
    assert out.getvalue().splitlines()[0] == "[x] trained: 30/3,600 rows (0.8%), 1.0 rows/s, 30s elapsed, ETA 59m30s"
    assert "\r" not in out.getvalue()


@pytest.mark.ray
def test_workers_report_to_a_board_and_the_driver_prints_their_sum(ray_cluster):
    """Two 'members' in Ray tasks, one resumed (4 of its 10 rows done before): the driver's line counts both."""
    import ray

    @ray.remote(num_cpus=0)
    def member(board, rank: int, resumed: int) -> None:
        reporter = BoardReporter(board, rank, total=10, already_done=resumed, every_s=0)
        for _ in range(10 - resumed):
            reporter.advance(1)
        ray.get(board.sums.remote())  # after this worker's reports (one caller's calls run in order)

    screen = Terminal()
    with board_progress("[ensemble] 2 members trained", poll_s=0.2, console=Console(screen)) as board:
        ray.get([member.remote(board, 0, 0), member.remote(board, 1, 4)])
    last, resumed = screen.getvalue().split("\r\x1b[K")[-1].split(" (+")
    assert re.fullmatch(r"\[ensemble\] 2 members trained: 16/16 rows \(100\.0%\), .*, \d+s elapsed", last), last
    assert resumed == "4 done before resuming: 20/20)"


def test_quieting_drops_the_lines_it_names_and_keeps_the_rest():
    """In a fresh interpreter (the quieting is process-wide): the named deprecation, Ray Train's per-report log and
    the placement-group cleaner's warning and thread death go; another warning, another thread's death stay."""
    code = textwrap.dedent(
        """
        import logging, os, threading, warnings
        from gradfilter_ray.console import PLACEMENT_GROUP_CLEANER_LOGGER as CLEANER_LOGGER
        from gradfilter_ray.console import PLACEMENT_GROUP_CLEANER_THREAD as CLEANER_THREAD, quiet_process
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        quiet_process()
        import ray.train.v2._internal.execution.context as train_context
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`kept_api` is deprecated", FutureWarning)
        train_context.logger.info("Reporting training result 1")
        logging.getLogger(CLEANER_LOGGER).warning("Failed to query Ray Train Controller actor state.")
        logging.getLogger("ray.train").warning("a kept Ray Train warning")
        def fail():
            raise RuntimeError("thread died")
        for name in (CLEANER_THREAD, "a-kept-thread"):
            thread = threading.Thread(target=fail, name=name)
            thread.start()
            thread.join()
        print(os.environ["HF_HUB_DISABLE_PROGRESS_BARS"], os.environ["RAY_DATA_LOG_LEVEL"])
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "`kept_api` is deprecated" in err and "is_gradient_checkpointing" not in err
    assert "a kept Ray Train warning" in err and "Failed to query" not in err and "Reporting training" not in err
    assert "Exception in thread a-kept-thread" in err and "PlacementGroupCleaner" not in err
    assert done.stdout.split() == ["1", "WARNING"]


def test_verbose_on_every_verb_sets_ray_log_level_info_unless_the_config_says_more(capsys):
    parser = cli.build_parser()
    for verb in ["run", *STAGES, "compare"]:
        assert parser.parse_args([verb, "--verbose"]).verbose, verb
    for extra, level in (([], "INFO"), (["--set", "ray.log_level=DEBUG"], "DEBUG")):
        assert cli.main(["data", "--config", str(TINY), "--dry-run", "--verbose", *extra]) == 0
        assert f"  log_level: {level}\n" in capsys.readouterr().out


def test_the_workers_are_quieted_at_the_default_level_only(monkeypatch):
    """On a cluster too (an address: no local settings touched here); not when `ray job submit` brought a hook."""
    quiet, verbose = (RayConfig(address="10.0.0.1:6379", log_level=level) for level in ("WARNING", "INFO"))
    assert init_kwargs(quiet)["runtime_env"]["worker_process_setup_hook"] == WORKER_SETUP_HOOK
    assert "worker_process_setup_hook" not in init_kwargs(verbose).get("runtime_env", {})
    job = {"runtime_env": {"worker_process_setup_hook": "their.own.hook"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert "worker_process_setup_hook" not in init_kwargs(quiet).get("runtime_env", {})


def test_the_stderr_filter_drops_ray_datas_constructor_line_and_passes_everything_else_even_when_the_driver_dies():
    noise = (
        "[2026-12-06 19:27:39,076 E 18782 18782] core_worker.cc:2465: Actor with class name: "
        "'MapWorker(MapBatches(ShardExtractor))' and ID: 'c8cfa81f375ea84ff9ee667c01000000' has constructor arguments "
        "in the object store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, "
        "the actor restart will fail."
    )
    other_actor = noise.replace("MapWorker(MapBatches(ShardExtractor))", "Trainer")
    driver = textwrap.dedent(
        f"""
        import os, sys
        from gradfilter_ray.console import filter_native_stderr
        assert filter_native_stderr() is not None
        os.write(2, b"before\\n" + {noise!r}.encode() + b"\\n" + {other_actor!r}.encode() + b"\\n")
        print("python's own stderr", file=sys.stderr, flush=True)
        os.write(2, b"no newline at the end")
        os._exit(9)
        """
    )
    done = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=60)
    assert done.returncode == 9
    # The filter drains what the dead driver wrote before the pipe reports its end (capture waits for it too).
    assert done.stderr == "before\n" + other_actor + "\npython's own stderr\nno newline at the end"


def test_a_stage_closing_line_shows_its_key_figures_in_order_with_floats_to_four_digits():
    counts = {
        "tokens_per_batch_min": 16384,
        "oom_splits": 0,
        "examples_per_s": 6.58123,
        "rows": 400,
        "shards_resumed": 0,
        "shards_computed": 4,
        "seconds_by_stage": {"tokens": 0.3},
    }
    line = closing_line("gradients", 61.84, counts)
    figures = "rows=400, shards_computed=4, shards_resumed=0, examples_per_s=6.581, oom_splits=0"
    assert line == f"[gradients] done in 61.8s: {figures}"
    losses = {"runs": 2, "heldout_loss": {"gsnr_0.15": 3.2394535525036194, "random_0.15": 3.19631}, "judge": "skipped"}
    assert closing_line("evaluation", 14.3, losses) == (
        "[evaluation] done in 14.3s: runs=2, heldout_loss={gsnr_0.15: 3.239, random_0.15: 3.196}, judge=skipped"
    )
    assert closing_line("data", 1.0, {}) == "[data] done in 1.0s"
    assert set(CLOSING_FIGURES) == set(STAGES)


def test_a_driver_that_exits_normally_waits_for_its_stderr_filter_to_pass_on_the_last_line():
    driver = textwrap.dedent(
        """
        import sys
        from gradfilter_ray.console import filter_native_stderr
        print(filter_native_stderr().pid, flush=True)
        print("last words", file=sys.stderr)
        """
    )
    out = tempfile.TemporaryFile()
    done = subprocess.run([sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=out, timeout=60)
    # stderr is a file, not a pipe: only the driver's wait at exit makes the line be there when the driver is gone
    assert done.returncode == 0 and not psutil.pid_exists(int(done.stdout))
    out.seek(0)
    assert out.read() == b"last words\n"
