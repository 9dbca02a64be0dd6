"""Shared fixtures: one local Ray cluster per test session (start-up is paid once), and small inputs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "gradfilter_ray" / "assets"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(ASSETS / "tokenizers" / "gpt2"))
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def llama_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS / "models" / "stories260K"))
