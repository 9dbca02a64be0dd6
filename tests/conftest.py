"""Shared fixtures: one local Ray cluster per test session (start-up is paid once), and small inputs."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
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


class S3Server:
    """A real S3 HTTP server (moto) on loopback, in this process; every request line is kept in `requests`."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.requests: list[str] = []
        log = logging.getLogger("werkzeug")
        log.setLevel(logging.INFO)
        log.propagate = False  # a handler of our own also keeps werkzeug from printing every request to stderr
        handler = logging.Handler()
        handler.emit = lambda record: self.requests.append(record.getMessage())
        log.addHandler(handler)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"{host}:{port}"

    def uri(self, prefix: str = "run") -> str:
        """A fresh bucket and the s3:// URI of `prefix` in it (pyarrow reads the endpoint from the query)."""
        bucket = f"gfr-{uuid.uuid4().hex[:12]}"
        return f"s3://{bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http&allow_bucket_creation=true"

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """An embedded local Ray (never attaches to another cluster on the machine), shut down at the end."""
    import ray

    # Socket paths under the temp dir must fit in 108 bytes: keep it short, not a deep pytest tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="gfr-", dir="/tmp")
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
