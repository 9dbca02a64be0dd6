"""Shared fixtures: one local Ray cluster per test session (start-up is paid once), and small inputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "gradfilter_ray" / "assets"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The object-store tests talk to a local S3 server (moto), which accepts any key. Set before any Ray worker starts
# so workers inherit them; never real credentials, and the metadata service is not asked for any.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "gfr-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "gfr-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


# What the end-to-end tests (CLI, `ray job submit`) override on the demo config: one small fine-tuning run and a
# tiny evaluation, so every stage runs for real in a couple of minutes.
TINY_TARGET_AND_EVALUATION = (
    "ray.progress_bars=false",
    "finetune.scorers=[gsnr]",
    "finetune.ratios=[0.15]",
    "finetune.epochs=1",
    "evaluation.test_sets=[vicuna]",
    "evaluation.max_prompts_per_set=2",
    "evaluation.max_new_tokens=8",
    "evaluation.heldout_limit=8",
)


def set_args(*overrides: str) -> list[str]:
    """CLI arguments for config overrides: ["--set", o1, "--set", o2, ...]."""
    return [arg for override in overrides for arg in ("--set", override)]


def write_canonical_data(folder: Path, ids, source_rows=None) -> None:
    """`data/` as ingest writes it, one Parquet file of synthetic canonical rows with these ids."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(ids)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "instruction": [f"instr {i}" for i in ids],
                "input": [""] * n,
                "output": [f"out {i}" for i in ids],
                "extra": ["{}"] * n,
                "source_format": ["alpaca"] * n,
                "source_file": ["f.jsonl"] * n,
                "source_row": ids if source_rows is None else np.asarray(source_rows),
            }
        ),
        folder / "part-00000.parquet",
    )


def synthetic_gradients(ids, members: int, rng):
    """A gradients table as extraction writes it: random but plausible norms (late below early) and losses."""
    import pyarrow as pa

    from gradfilter_ray.gradients.stage import GRADIENT_SCHEMA

    n, m = len(ids), members
    early = rng.uniform(1, 4, (n, m))

    def lists(a):
        return pa.array(list(a), pa.list_(pa.float64()))

    return pa.table(
        {
            "id": ids,
            "sq_norm_early": lists(early),
            "sq_norm_late": lists(early * rng.uniform(0.2, 0.9, (n, m))),
            "loss_early": lists(rng.uniform(1, 3, (n, m))),
            "loss_late": lists(rng.uniform(0.5, 2, (n, m))),
            "n_response_tokens": rng.integers(1, 30, n),
            "n_tokens": rng.integers(31, 60, n),
            "ifd_loss_cond": rng.uniform(1, 2, n),
            "ifd_loss_uncond": rng.uniform(2, 3, n),
        }
    ).cast(GRADIENT_SCHEMA)


class ByteCounter:
    """WSGI middleware: bytes each client process sent (request bodies) and received (response bodies), by pid.
    The pid owning a connection is looked up once per client port (the SDKs keep connections alive)."""

    def __init__(self, app) -> None:
        self.app = app
        self.server_port = 0
        self.by_pid: dict[int | None, list[int]] = {}
        self.by_pid_and_path: dict[tuple[int | None, str], int] = {}
        self._pids: dict[int, int | None] = {}
        self._lock = threading.Lock()

    def _pid(self, client_port: int) -> int | None:
        import psutil

        if client_port not in self._pids:
            for conn in psutil.net_connections(kind="tcp"):
                ours = conn.raddr and conn.raddr.port == self.server_port
                if ours and conn.laddr and conn.laddr.port == client_port:
                    self._pids[client_port] = conn.pid
                    break
        return self._pids.get(client_port)

    def _add(self, pid: int | None, sent: int, received: int) -> None:
        with self._lock:
            counts = self.by_pid.setdefault(pid, [0, 0])
            counts[0] += sent
            counts[1] += received

    def __call__(self, environ, start_response):
        pid = self._pid(int(environ.get("REMOTE_PORT") or 0))
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
    import psutil

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
