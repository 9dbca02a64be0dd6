"""Careless and hostile inputs through the real CLI: each is one line on stderr naming the file and the problem, the
exit code docs/errors.md gives it, no user file lost, no manifest saying a stage runs, and (where a look before
reading can tell) no Ray started. The hostile rows inside a readable file: test_bad_input.py."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradfilter_ray import cli, preflight
from gradfilter_ray.data.sources import find_sources
from gradfilter_ray.driver_claim import CLAIM_FILE
from gradfilter_ray.rundir import MANIFEST, RunDir
from gradfilter_ray.storage import open_location

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny_gpt2.yaml"
ROWS = [{"instruction": f"Task {i}", "input": "", "output": f"Answer {i}"} for i in range(5)]
PREFLIGHT_S = 3.0  # a refusal before Ray starts is a look at a few small files (Ray's start alone is 10 s and more)


@dataclass
class Outcome:
    code: int
    err: list[str]  # stderr's lines
    seconds: float


def gfr(capsys, *overrides: str, verb: str = "data") -> Outcome:
    """`gradfilter-ray VERB` on the tiny config, in this process."""
    capsys.readouterr()
    started = time.perf_counter()
    code = cli.main([verb, "--config", str(TINY), *(arg for o in overrides for arg in ("--set", o))])
    seconds = time.perf_counter() - started
    return Outcome(code, capsys.readouterr().err.splitlines(), seconds)


def jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def write(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def empty_parquet(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), path)
    return path


def truncated_gz(path: Path, rows: int) -> Path:
    whole = gzip.compress(jsonl({"instruction": f"Task {i}", "output": f"Answer {i}"} for i in range(rows)))
    return write(path, whole[: len(whole) // 2])


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# (what the input is, its data.path made under tmp_path, the output_dir, the message after "error: ")
REFUSED = {
    "a path that does not exist": (
        lambda t: t / "missing.jsonl",
        lambda t: t / "run",
        lambda t: f"input not found: {t / 'missing.jsonl'}",
    ),
    "a glob matching nothing": (
        lambda t: write(t / "shards" / "notes.txt", b"x").parent / "*.jsonl",
        lambda t: t / "run",
        lambda t: f"no input files match {t / 'shards' / '*.jsonl'}",
    ),
    "a .json holding JSON Lines": (
        lambda t: write(t / "rows.json", jsonl(ROWS)),
        lambda t: t / "run",
        lambda t: f"{t / 'rows.json'} holds JSON Lines (one record per line), not a JSON list: rename it to .jsonl",
    ),
    "a .json holding JSON Lines past the part looked at": (
        lambda t: write(t / "big.json", jsonl({"instruction": "x", "output": "y" * 100_000} for _ in range(15))),
        lambda t: t / "run",
        lambda t: f"{t / 'big.json'} holds JSON Lines (one record per line), not a JSON list: rename it to .jsonl",
    ),
    "a .parquet holding text": (
        lambda t: write(t / "rows.parquet", b"instruction,output\nhi,there\n"),
        lambda t: t / "run",
        lambda t: f"{t / 'rows.parquet'} is not a Parquet file (it does not start with PAR1)",
    ),
    "a small truncated .gz": (
        lambda t: truncated_gz(t / "rows.jsonl.gz", 500),
        lambda t: t / "run",
        lambda t: f"cannot read {t / 'rows.jsonl.gz'}: Truncated compressed stream",
    ),
    "data.path equal to output_dir": (
        lambda t: write(t / "corpus" / "a.jsonl", jsonl(ROWS)).parent,
        lambda t: t / "corpus",
        lambda t: f"data.path {t / 'corpus'} is output_dir itself: give the run an output_dir of its own",
    ),
    "output_dir inside the input folder": (
        lambda t: write(t / "corpus" / "a.jsonl", jsonl(ROWS)).parent,
        lambda t: t / "corpus" / "run",
        lambda t: (
            f"output_dir {t / 'corpus' / 'run'} lies inside the input folder {t / 'corpus'}: the run's own outputs "
            "would be read back as input; choose an output_dir outside it"
        ),
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_unusable_input_is_one_line_and_exit_2_before_anything_is_touched(case, tmp_path, capsys):
    make_input, output_dir, message = REFUSED[case]
    data_path, out = make_input(tmp_path), output_dir(tmp_path)
    existed = out.exists()
    result = gfr(capsys, f"output_dir={out}", f"data.path={data_path}")
    assert (result.code, result.err) == (2, [f"error: {message(tmp_path)}"])
    assert result.seconds < PREFLIGHT_S
    assert out.exists() == existed and not (out / MANIFEST).exists() and not (out / CLAIM_FILE).exists()


EMPTY = {
    "empty.jsonl": lambda p: write(p, b""),
    "blank.jsonl": lambda p: write(p, b"\n  \n\r\n"),
    "empty.json": lambda p: write(p, b""),
    "list.json": lambda p: write(p, b"[]"),
    "wrapped.json": lambda p: write(p, b'{"data": []}'),
    "rows.parquet": empty_parquet,
    "rows.jsonl.gz": lambda p: write(p, gzip.compress(b"")),
    "folder": lambda p: (write(p / "a.jsonl", b""), empty_parquet(p / "b.parquet"))[0].parent,
}


@pytest.mark.parametrize("name", list(EMPTY))
def test_an_empty_input_is_nothing_to_do_in_every_format(name, tmp_path, capsys):
    data_path = EMPTY[name](tmp_path / name)
    result = gfr(capsys, f"output_dir={tmp_path / 'run'}", f"data.path={data_path}")
    held = "(2 files) hold" if name == "folder" else "holds"
    assert (result.code, result.err) == (2, [f"error: nothing to do: {data_path} {held} no rows"])
    assert result.seconds < PREFLIGHT_S and not (tmp_path / "run").exists()


def test_output_dir_dot_over_the_users_data_folder_loses_nothing(tmp_path, capsys, monkeypatch):
    project = tmp_path / "project"
    write(project / "data" / "alpaca.json", json.dumps(ROWS).encode())
    write(project / "notes.txt", b"mine")
    before = files_under(project)
    monkeypatch.chdir(project)

    result = gfr(capsys, "output_dir=.", "data.path=data/alpaca.json")
    assert result.code == 2 and result.err == [
        "error: data.path data/alpaca.json lies inside output_dir .: a stage replaces what it writes there; move "
        "the input out or choose another output_dir"
    ]
    assert files_under(project) == before and result.seconds < PREFLIGHT_S

    # With the input elsewhere, the user's data/ is still not the run's to replace.
    elsewhere = write(tmp_path / "in.jsonl", jsonl(ROWS))
    result = gfr(capsys, "output_dir=.", f"data.path={elsewhere}")
    assert result.code == 2 and result.err == [
        "error: output_dir . already holds 'data', which this tool did not write (its manifest has no record of "
        "it): move it away or choose another output_dir; it is left as it is"
    ]
    assert files_under(project) == before and result.seconds < PREFLIGHT_S


def test_a_stage_whose_upstream_outputs_are_missing_exits_4_before_ray_starts(tmp_path, capsys):
    out = tmp_path / "run"
    result = gfr(capsys, f"output_dir={out}", verb="scoring")
    assert (result.code, result.err) == (
        4,
        [
            f"error: stage 'scoring' needs the output of 'gradients' for this config in {out}: run "
            "`gradfilter-ray gradients` (or `gradfilter-ray run`) first"
        ],
    )
    assert result.seconds < PREFLIGHT_S and not (out / MANIFEST).exists()


def test_a_missing_input_is_reported_in_about_a_second_without_starting_ray(tmp_path):
    """The process as a user starts it: one line, exit 2, and no Ray session ever created in its RAY_TMPDIR."""
    ray_tmp = tempfile.mkdtemp(prefix="gfr-", dir="/tmp")  # short: Ray's socket paths must fit, were it to start
    missing, out = tmp_path / "missing.jsonl", tmp_path / "run"
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gradfilter_ray", "data", "-c", str(TINY), "--set", f"output_dir={out}"]
            + ["--set", f"data.path={missing}"],
            env={**os.environ, "RAY_TMPDIR": ray_tmp},
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds = time.perf_counter() - started
        assert (done.returncode, done.stderr.splitlines()) == (2, [f"error: input not found: {missing}"])
        assert os.listdir(ray_tmp) == [] and not out.exists()
        assert seconds < 8  # interpreter and imports; the same error came after Ray's start (13 s) before
    finally:
        os.rmdir(ray_tmp)


def test_an_object_store_that_never_answers_is_given_up_on_in_bounded_time(tmp_path, capsys, monkeypatch):
    """An endpoint that accepts connections and never replies (as a blackholed network does): the S3 client would
    retry for about 100 s; the look at the input stops at REMOTE_LOOK_S."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept_and_say_nothing():
        try:
            while True:
                held.append(silent.accept()[0])
        except OSError:  # the server is closed: the test is over
            pass

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    monkeypatch.setattr(preflight, "REMOTE_LOOK_S", 2.0)
    uri = (
        f"s3://some-bucket/x.jsonl?endpoint_override=127.0.0.1:{silent.getsockname()[1]}&scheme=http&region=us-east-1"
    )
    try:
        result = gfr(capsys, f"output_dir={tmp_path / 'run'}", f"data.path={uri}")
    finally:
        silent.close()
        for connection in held:
            connection.close()
    assert result.code == 2 and result.err == [
        f"error: no answer from {uri} within 2 s: check the network, the endpoint and the credentials "
        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, or the node's role)"
    ]
    assert result.seconds < 2.0 + PREFLIGHT_S and not (tmp_path / "run").exists()


def test_inputs_on_an_object_store_are_looked_at_before_ray_starts(s3_server, tmp_path, capsys):
    uri = s3_server.uri("corpus")
    corpus = open_location(uri)
    corpus.make_dir()
    (corpus / "a.jsonl").write_bytes(jsonl(ROWS))
    (corpus / "b.parquet").write_bytes(b"not a table")
    result = gfr(capsys, f"output_dir={tmp_path / 'run'}", f"data.path={uri}")
    bad = f"s3://{corpus.path}/b.parquet"
    assert (result.code, result.err) == (2, [f"error: {bad} is not a Parquet file (it does not start with PAR1)"])
    assert not (tmp_path / "run").exists()


def test_an_unexpected_failure_exits_1_with_its_traceback(capsys):
    try:
        {}["no such key"]
    except KeyError as exc:
        code = cli._failed(exc)
    err = capsys.readouterr().err
    assert code == cli.EXIT_UNEXPECTED == 1
    assert err.startswith("Traceback (most recent call last):") and "KeyError: 'no such key'" in err


@pytest.mark.ray
def test_a_truncated_gz_found_mid_read_is_one_line_exit_2_and_a_failed_record(ray_cluster, tmp_path, capsys):
    """Past the part a look reads (the data stage, in Ray, finds it): the read task's error, out of Ray's wrappers."""
    path, out = truncated_gz(tmp_path / "big.jsonl.gz", 4000), tmp_path / "run"
    result = gfr(capsys, f"output_dir={out}", f"data.path={path}", "data.limit=null")
    message = f"cannot read {path}: Truncated compressed stream"
    assert result.code == 2
    # (Ray relays its workers' own lines, each prefixed "(task pid=...)", to the driver's stderr as they come)
    assert [line for line in result.err if not line.startswith("(")] == [f"error: {message}"]
    record = RunDir(str(out)).stage_record("data")
    assert (record["status"], record["reason"]) == ("failed", message)


@pytest.mark.ray
@pytest.mark.timeout(180)  # a listing that follows links round a cycle would never end
def test_links_back_up_the_tree_are_not_followed_and_a_name_with_glob_characters_is_taken_as_it_is(
    ray_cluster, tmp_path, capsys
):
    corpus, out = tmp_path / "corpus", tmp_path / "run"
    write(corpus / "a[1].jsonl", jsonl(ROWS[:3]))
    write(corpus / "sub" / "b.jsonl", jsonl(ROWS[3:]))
    for link, target in (("self", "."), ("loop", "."), ("sub/up", "..")):
        (corpus / link).symlink_to(target)

    result = gfr(capsys, f"output_dir={out}", f"data.path={corpus}", "data.limit=null")
    assert result.code == 0, result.err
    assert [line for line in result.err if line.startswith("note:")] == [
        f"note: data.path {corpus}: left out {corpus / name} (a link to a folder above it)"
        for name in ("loop", "self", "sub/up")
    ]
    record = RunDir(str(out)).stage_record("data")
    assert (record["status"], record["files"], record["rows_in"]) == ("done", 2, 5)

    result = gfr(capsys, f"output_dir={out}", f"data.path={corpus / 'a[1].jsonl'}", "data.limit=null")
    record = RunDir(str(out)).stage_record("data")
    assert result.code == 0 and (record["files"], record["rows_in"]) == (1, 3)


@pytest.mark.ray
def test_an_empty_input_only_reading_shows_is_nothing_to_do_too(ray_cluster, tmp_path, capsys):
    """Blank lines past the part a look reads: the data stage finds no rows, and says so as the look would."""
    path, out = write(tmp_path / "blank.jsonl", b"\n" * (200 << 10)), tmp_path / "run"
    result = gfr(capsys, f"output_dir={out}", f"data.path={path}")
    message = f"nothing to do: {path} holds no rows"
    assert result.code == 2
    assert [line for line in result.err if not line.startswith("(")] == [f"error: {message}"]
    record = RunDir(str(out)).stage_record("data")
    assert (record["status"], record["reason"]) == ("failed", message)


def test_a_folder_reached_two_ways_is_globbed_under_either_and_a_linked_file_is_read_once(tmp_path):
    corpus = tmp_path / "c"
    write(corpus / "a" / "x.jsonl", jsonl(ROWS[:2]))
    (corpus / "b").mkdir()
    (corpus / "b" / "shards").symlink_to("../a")
    (corpus / "a" / "y.jsonl").symlink_to("x.jsonl")

    through_link = find_sources(f"{corpus}/b/*/*.jsonl", "auto")
    assert [f.path for f in through_link.files] == [f"{corpus}/b/shards/x.jsonl"]
    assert through_link.skipped == [f"{corpus}/b/shards/y.jsonl (the same file as {corpus}/b/shards/x.jsonl)"]
    whole = find_sources(str(corpus), "auto")
    assert [f.path for f in whole.files] == [f"{corpus}/a/x.jsonl"]
    assert sorted(whole.skipped) == sorted(
        f"{corpus}/{p} (the same file as {corpus}/a/x.jsonl)"
        for p in ("a/y.jsonl", "b/shards/x.jsonl", "b/shards/y.jsonl")
    )


def test_a_manifest_json_this_tool_did_not_write_is_refused_and_left_as_it_is(tmp_path, capsys):
    out, path = tmp_path / "project", write(tmp_path / "in.jsonl", jsonl(ROWS))
    theirs = write(out / MANIFEST, json.dumps({"name": "my-extension", "stages": ["build"]}).encode())
    before = theirs.read_bytes()
    result = gfr(capsys, f"output_dir={out}", f"data.path={path}")
    assert result.code == 2 and result.err == [
        f"error: {theirs} is not a run manifest this tool wrote: choose another output_dir"
    ]
    assert theirs.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [MANIFEST]
    assert result.seconds < PREFLIGHT_S


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(180)
def test_ctrl_c_during_training_ends_with_130_and_one_line_and_the_stage_recorded_interrupted(
    ray_cluster, tmp_path, capsys
):
    """SIGINT while the ensemble trains: Ray Train's own Ctrl-C handler is in place then, and ends in sys.exit."""
    path, out = write(tmp_path / "in.jsonl", jsonl(ROWS * 4)), tmp_path / "run"
    sent = threading.Event()

    def interrupt_once_training_started() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not sent.is_set():
            if list((out / ".ray_train").glob("ensemble-*")):  # Ray Train's run folder: fit() is under way
                sent.set()
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)

    threading.Thread(target=interrupt_once_training_started, daemon=True).start()
    result = gfr(capsys, f"output_dir={out}", f"data.path={path}", "data.limit=null", verb="run")
    assert sent.is_set() and result.code == 130, result.err
    assert result.err[-1] == "interrupted: the same command resumes the run where it stopped", result.err
    stages = RunDir(str(out)).read_manifest()["stages"]
    assert stages["tokens"]["status"] == "done" and "running" not in {r["status"] for r in stages.values()}
    assert [(n, r["reason"]) for n, r in stages.items() if r["status"] == "failed"] == [("ensemble", "interrupted")]
