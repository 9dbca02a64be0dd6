"""Shared fixtures: one local Ray cluster per test session (start-up is paid once), small inputs, and the session's
CLI runs (tests/cli_runs.py: one reference run of the tiny config, the same config faulted and resumed, the demo on
s3://), started together in the background and read by every test that needs a finished run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "gradfilter_ray" / "assets"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The session's processes (this one, its CLI runs, probes and every Ray worker, which inherit it) share 2 cores: an
# OpenMP thread that waits for work sleeps instead of spinning, which on oversubscribed cores burns several times
# the CPU of the tiny models' work itself (measured: 3 processes of 64x64 matmuls, 4.8 CPU-s each spinning, 0.5
# sleeping). Set before torch loads its OpenMP runtime; results are the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No idle workers started ahead of a driver's first task: the suite starts over a dozen local Rays (its own, the CLI
# runs', the probes'), and a worker nobody asks for costs its start-up (~2 CPU-s) on cores every test shares.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
# The embedded Ray's Ray Train tick and no preemption watcher (runtime.init_kwargs sets both for the CLI) for the
# session's own Ray and the probes too.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# The session's CLI runs and probes start processes beside the in-process tests on 2 cores, at a lower priority
# (yield_to_the_session): give Ray Train's worker groups (the session's, the probes', the CLI runs') time to come up.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
# The object-store tests talk to a local S3 server (moto), which accepts any key. Set before any Ray worker starts
# so workers inherit them; never real credentials, and the metadata service is not asked for any.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "gfr-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "gfr-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def write_canonical_data(folder, ids, source_rows=None, extra=None, row_group_size=None) -> None:
    """`data/` as ingest writes it, one Parquet file of synthetic canonical rows with these ids (`folder`: a path or a
    local Location; `extra`: each row's other keys as JSON text, default none)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(ids)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "instruction": [f"instr {i}" for i in ids],
                "input": [""] * n,
                "output": [f"out {i}" for i in ids],
                "extra": ["{}"] * n if extra is None else list(extra),
                "source_format": ["alpaca"] * n,
                "source_file": ["f.jsonl"] * n,
                "source_row": ids if source_rows is None else np.asarray(source_rows),
            }
        ),
        folder / "part-00000.parquet",
        row_group_size=row_group_size,
    )


def synthetic_gradients(ids, members: int, rng, bad: dict[int, dict] | None = None):
    """A gradients table as extraction writes it: random but plausible norms (late below early) and losses; `bad`
    maps a row index to column overrides (injected faults: NaN, inf, zero norms, no response tokens ...)."""
    import pyarrow as pa

    from gradfilter_ray.gradients.extract import GRADIENT_SCHEMA

    n, m = len(ids), members
    early = rng.uniform(1, 4, (n, m))
    columns = {
        "sq_norm_early": early,
        "sq_norm_late": early * rng.uniform(0.2, 0.9, (n, m)),
        "loss_early": rng.uniform(1, 3, (n, m)),
        "loss_late": rng.uniform(0.5, 2, (n, m)),
        "n_response_tokens": rng.integers(1, 30, n),
        "n_tokens": rng.integers(31, 60, n),
        "ifd_loss_cond": rng.uniform(1, 2, n),
        "ifd_loss_uncond": rng.uniform(2, 3, n),
    }
    for row, overrides in (bad or {}).items():
        for column, value in overrides.items():
            columns[column][row] = value
    lists = {c: pa.array(list(columns[c]), pa.list_(pa.float64())) for c in columns if columns[c].ndim == 2}
    return pa.table({"id": ids, **{c: lists.get(c, columns[c]) for c in columns}}).cast(GRADIENT_SCHEMA)


def model_stages() -> list[str]:
    """The stages before scoring, in the table's order: what a synthetic gradients table stands in for."""
    from gradfilter_ray import pipeline

    names = list(pipeline.STAGES)
    return names[: names.index("scoring")]


def synthetic_run(root: Path, cfg, ids, rng, bad: dict[int, dict] | None = None, data: bool = True, parts: int = 1):
    """A run directory that `run` goes on with from scoring: data/ (unless data=False: the caller's ingest wrote
    it) and gradients/ for these ids as the real stages write them, and every stage before scoring recorded done for
    `cfg`. `bad` as in synthetic_gradients; the gradients table is written in `parts` files."""
    import numpy as np
    import pyarrow.parquet as pq

    from gradfilter_ray import pipeline
    from gradfilter_ray.rundir import RunDir

    run = RunDir(str(root))
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    if data:
        write_canonical_data(Path(run.data), ids, source_rows=np.arange(n))
    run.gradients.make_dir()
    table = synthetic_gradients(ids, cfg.ensemble.members, rng, bad)
    step = -(-n // parts)
    for k in range(parts):
        pq.write_table(table.slice(k * step, step), run.gradients / f"part-{k}.parquet")
    counts = {"rows_in": n, "rows_kept": n, "rows_rejected": 0, "rejects_by_reason": {}} if data else {}
    for stage in model_stages():
        if data or stage != "data":
            run.record_stage(stage, {"status": "done", "key": pipeline.stage_key(stage, cfg), **counts})
    return run


LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/tcp prints it
ESTABLISHED = "01"


def loopback_socket_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the open TCP socket from 127.0.0.1:`local_port` to 127.0.0.1:`remote_port` (/proc/net/tcp)."""
    local, remote = f"{LOOPBACK_HEX}:{local_port:04X}", f"{LOOPBACK_HEX}:{remote_port:04X}"
    with open("/proc/net/tcp") as fh:
        for line in fh:
            fields = line.split()
            if fields[1:4] == [local, remote, ESTABLISHED] and fields[9] != "0":
                return int(fields[9])
    return None


def socket_owner(inode: int, likely: list[int]) -> int | None:
    """The pid of a process holding the socket: the `likely` pids first, then every process, highest pid first."""
    from leak_guard import fd_targets

    target = f"socket:[{inode}]"
    others = sorted((int(p) for p in os.listdir("/proc") if p.isdigit()), reverse=True)
    return next((pid for pid in dict.fromkeys([*likely, *others]) if target in fd_targets(pid)), None)


class ByteCounter:
    """WSGI middleware: bytes each client process sent (request bodies) and received (response bodies), by pid.
    The pid owning a connection is looked up once per connection (the SDKs keep connections alive), keyed by the
    connection's socket, not its client port: a closed connection's port is soon reused by another process. The
    lookup stops at the first process holding the socket and tries the processes that connected before first (a
    process opens several connections): the S3 demo opens hundreds of connections while its Rays run hundreds of
    processes, and listing every connection of every process each time (psutil.net_connections) costs seconds."""

    def __init__(self, app) -> None:
        self.app = app
        self.server_port = 0
        self.by_pid: dict[int | None, list[int]] = {}
        self.by_pid_and_path: dict[tuple[int | None, str], int] = {}
        self._pids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # connection socket -> pid
        self._clients: dict[int, None] = {}  # pids that connected, the latest last
        self._lock = threading.Lock()

    def _pid(self, connection, client_port: int) -> int | None:
        if connection not in self._pids:
            inode = loopback_socket_inode(client_port, self.server_port)
            with self._lock:
                likely = list(reversed(self._clients))
            pid = socket_owner(inode, likely) if inode else None
            if pid is not None:
                with self._lock:
                    self._clients.pop(pid, None)
                    self._clients[pid] = None
            self._pids[connection] = pid  # looked up once: a connection found nowhere counts under None
        return self._pids[connection]

    def _add(self, pid: int | None, sent: int, received: int) -> None:
        with self._lock:
            counts = self.by_pid.setdefault(pid, [0, 0])
            counts[0] += sent
            counts[1] += received

    def __call__(self, environ, start_response):
        pid = self._pid(environ["werkzeug.socket"], int(environ.get("REMOTE_PORT") or 0))
        path = "/".join(environ.get("PATH_INFO", "").split("/")[3:4])  # /bucket/prefix/<this>/...
        moved = int(environ.get("CONTENT_LENGTH") or 0)
        self._add(pid, moved, 0)
        for chunk in self.app(environ, start_response):
            self._add(pid, 0, len(chunk))
            moved += len(chunk)
            yield chunk
        with self._lock:
            self.by_pid_and_path[(pid, path)] = self.by_pid_and_path.get((pid, path), 0) + moved

    def reset(self) -> None:
        with self._lock:
            self.by_pid.clear()
            self.by_pid_and_path.clear()


class S3Server:
    """A real S3 HTTP server (moto) on loopback, in this process; every request line is kept in `requests`, and
    `bytes` counts what each client process uploaded and downloaded."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self.requests: list[str] = []
        log = logging.getLogger("werkzeug")
        log.setLevel(logging.INFO)
        log.propagate = False  # a handler of our own also keeps werkzeug from printing every request to stderr
        handler = logging.Handler()
        handler.emit = lambda record: self.requests.append(record.getMessage())
        log.addHandler(handler)
        self.bytes = ByteCounter(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, self.bytes, True, request_handler=MotoRequestHandler)
        host, port = self._server.server_address[:2]
        self.bytes.server_port = port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"{host}:{port}"

    def uri(self, prefix: str = "run") -> str:
        """A fresh bucket and the s3:// URI of `prefix` in it (pyarrow reads the endpoint from the query)."""
        bucket = f"gfr-{uuid.uuid4().hex[:12]}"
        return f"s3://{bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http&allow_bucket_creation=true"

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


# The session's background work (its CLI runs and probes) runs at a lower priority than the in-process tests: the
# tests' own gaps (a Ray Train start, a judge's reply, one thread of Python) are filled with background work instead
# of the tests waiting for a share of the cores, and the background, read only at the end, finishes in what is left.
# Not lower: a starved Ray fails to start (ray.init gives its raylet 30 s; seen at nice 10 beside two busy sessions).
BACKGROUND_NICE = 5
_autogroup_lock = threading.Lock()
_background_probes: set = set()  # the probes running in sessions of their own (Popen), killed if the session ends


def yield_to_the_session(pid: int, nice: int = BACKGROUND_NICE) -> None:
    """Lower the priority of a process started in a session of its own (`start_new_session`) and of what it starts:
    its session's autogroup (with autogroup on, Linux shares the cores between sessions first) and the process
    itself (where autogroup is off, or the process is outside the root CPU cgroup, where only its own nice counts).
    Best effort: where neither can be set it runs at the session's priority."""
    autogroup = Path(f"/proc/{pid}/autogroup")
    with _autogroup_lock:
        # without CAP_SYS_ADMIN Linux takes one autogroup nice per 100 ms machine-wide (EAGAIN otherwise)
        for _ in range(12):
            try:
                autogroup.write_text(str(nice))
                break
            except BlockingIOError:
                time.sleep(0.1)
            except OSError:
                break
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError:
        pass


def run_probe(
    script: Path, *args: str, tag: str, timeout: int, env: dict | None = None, low_priority: bool = False
) -> dict:
    """Run a probe script (a local Ray of its own) in a subprocess with a fresh Ray temp dir, removed once it exits
    (leak_guard finds leaked processes by their environment, not by the folder); the JSON of its last line.
    `low_priority`: in a session of its own at the background's priority (yield_to_the_session), its process group
    killed on timeout or when the test session ends first (stop_background_probes)."""
    import subprocess
    import sys

    from cli_runs import kill_group

    ray_tmp = tempfile.mkdtemp(prefix=f"gfr-{tag}-", dir="/tmp")  # short: Ray's socket paths must fit
    try:
        proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            env={**os.environ, **(env or {}), "RAY_TMPDIR": ray_tmp},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=low_priority,
        )
        if low_priority:
            _background_probes.add(proc)
            yield_to_the_session(proc.pid)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc) if low_priority else proc.kill()
            try:
                _, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                stderr = ""
            raise AssertionError(f"{script.name} ran over {timeout} s:\n{(stderr or '')[-4000:]}") from None
        finally:
            _background_probes.discard(proc)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def stop_background_probes() -> None:
    """At the session's end (an interrupted one: a probe in a session of its own gets no Ctrl-C): kill the probes
    still running."""
    from cli_runs import kill_group

    for proc in list(_background_probes):
        kill_group(proc)


def reply(content: str) -> tuple:
    """A ChatServer action: answer 200 with this assistant message."""
    return ("ok", content)


def status(code: int, body: str = "", headers: dict | None = None) -> tuple:
    """A ChatServer action: answer with this status, raw body and headers."""
    return ("status", code, body, headers or {})


HANG = ("hang",)  # a ChatServer action: never answer (until close)


class ChatServer:
    """A local OpenAI-compatible chat-completions endpoint: `respond(request_body)` picks each answer (`reply`,
    `status` or HANG); every request received is kept in `requests`."""

    def __init__(self, respond: Callable[[dict], tuple]) -> None:
        self.requests: list[dict] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                action = respond(body)
                if action[0] == "hang":
                    server.release.wait(10)  # longer than a client's timeout; released by close()
                    return
                if action[0] == "ok":
                    code, headers = 200, {}
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": action[1]}}]})
                else:
                    _, code, payload, headers = action
                data = payload.encode()
                self.send_response(code)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda *args: None  # a client hanging up on a slow reply is expected
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # a short poll keeps shutdown() from costing the default 0.5 s
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def ray_cluster():
    """An embedded local Ray (never attaches to another cluster on the machine), shut down at the end."""
    import ray
    from leak_guard import register_ray_tmp

    # Socket paths under the temp dir must fit in 108 bytes: keep it short, not a deep pytest tmp_path.
    temp_dir = register_ray_tmp(tempfile.mkdtemp(prefix="gfr-", dir="/tmp"))  # checked by leak_guard at exit
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level="WARNING")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _reads_cli_runs(item) -> bool:
    from cli_runs import PIPELINES

    return bool(set(getattr(item, "fixturenames", ())) & set(PIPELINES))


def _probe_of(item) -> str | None:
    from probes import MODULES

    return MODULES.get(getattr(item.module, "__name__", ""))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    """Order the session so that its background work keeps both cores busy from start to end: the CLI runs of
    tests/cli_runs.py and the probes of tests/probes.py run in background threads, at a lower priority
    (`yield_to_the_session`), while the in-process tests run in this one. First every test that reads neither: the
    quick ones before the slow ones; then the tests that read the CLI runs, a module once the last run it reads has
    finished; the probe modules last."""
    from cli_runs import PIPELINES

    last = [item for item in items if _reads_cli_runs(item)]
    # a module's readers once the last run it reads has finished (PIPELINES is in the order the runs finish)
    module_waits: dict = {}
    for item in last:
        runs = [list(PIPELINES).index(name) for name in item.fixturenames if name in PIPELINES]
        module_waits[item.module] = max([module_waits.get(item.module, 0), *runs])
    last.sort(key=lambda item: module_waits[item.module])
    last += [item for item in items if _probe_of(item) and item not in last]
    middle = [item for item in items if item not in last]
    quick = [item for item in middle if item.get_closest_marker("slow") is None]
    items[:] = quick + [item for item in middle if item not in quick] + last


def pytest_collection_finish(session):
    """The session's first test starts the CLI runs (conftest's `_cli_runs`, session-scoped): chosen once `-m` and
    `-k` have deselected, so that it is a test that runs."""
    items = session.items
    if items and any(_reads_cli_runs(item) for item in items):
        items[0].fixturenames.append("_cli_runs")


_probes_queued = False


def pytest_runtest_setup(item):
    """With the session's first test, queue every probe this session's tests read on the background thread: they
    run beside the CLI runs and the in-process tests."""
    global _probes_queued
    if not _probes_queued:
        import probes

        probes.start({p for p in map(_probe_of, item.session.items) if p})
        _probes_queued = True


def pytest_sessionfinish(session, exitstatus):
    import probes

    probes.stop()


@pytest.fixture(scope="session")
def _cli_runs(request, tmp_path_factory):
    """The CLI runs of tests/cli_runs.py that this session's selected tests use, started together in background
    threads by the session's first test (pytest_collection_finish), or by the first test that asks for one when run
    on its own; stopped (if still running) and their Ray temp dirs removed at the end of the session."""
    from concurrent.futures import ThreadPoolExecutor

    from cli_runs import PIPELINES, Pipeline

    used = sorted({name for item in request.session.items for name in item.fixturenames if name in PIPELINES})
    abort = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, len(used)), thread_name_prefix="gfr-cli-run")
    runs = {}
    for name in used:
        run, needs = PIPELINES[name]
        pipeline = Pipeline(tmp_path_factory.mktemp(name), abort)
        runs[name] = (pipeline, pool.submit(run, pipeline, *(request.getfixturevalue(f) for f in needs)))
    try:
        yield {name: future for name, (_, future) in runs.items()}
    finally:
        abort.set()  # a run still going (an interrupted session) kills its CLI and returns
        for pipeline, future in runs.values():
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - already reported by the tests that used it
                pass
            pipeline.cleanup()
        pool.shutdown()


@pytest.fixture(scope="session")
def reference_run(_cli_runs) -> dict:
    """The shared finished run of the tiny config (tests/cli_runs.py: run_reference); read it, never write to it."""
    return _cli_runs["reference_run"].result()


@pytest.fixture(scope="session")
def faulted_run(_cli_runs) -> dict:
    """The same config run with faults, then resumed (tests/cli_runs.py: run_faulted): what happened, as facts."""
    return _cli_runs["faulted_run"].result()


@pytest.fixture(scope="session")
def s3_demo_run(_cli_runs) -> dict:
    """The demo config end to end on s3:// (tests/cli_runs.py: run_s3_demo): what happened, as facts."""
    return _cli_runs["s3_demo_run"].result()


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(ASSETS / "tokenizers" / "gpt2"))
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def llama_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS / "models" / "stories260K"))


# At the end of the session, fail if any process of the suite's own Ray sessions (every temp dir given to
# register_ray_tmp, to a subprocess as RAY_TMPDIR or to `ray start --temp-dir`) is still alive: tests/leak_guard.py.
pytest_plugins = ["leak_guard"]
