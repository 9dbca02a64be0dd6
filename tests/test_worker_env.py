"""Every worker of the job runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the user set the
allocator's variable (either name): one in the driver's environment is what ray.init passes on instead (so workers
on every node get it); one in the job's runtime_env stands, and ray.init then names none (Ray refuses to merge a
job's runtime_env with a ray.init one that names the same variable)."""

from __future__ import annotations

import json

import pytest
from conftest import run_probe
from probes import TESTS

from gradfilter_ray.config import RayConfig
from gradfilter_ray.runtime import ALLOC_CONF_NAMES, JOB_CONFIG_ENV, allocator_env, init_kwargs

EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*ALLOC_CONF_NAMES, JOB_CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("address", [None, "10.0.0.1:6379"])
def test_init_kwargs_give_the_workers_expandable_segments_by_default(clean_env, address):
    env = init_kwargs(RayConfig(address=address))["runtime_env"]["env_vars"]
    assert {k: v for k, v in env.items() if k in ALLOC_CONF_NAMES} == EXPANDABLE


@pytest.mark.parametrize("name", ALLOC_CONF_NAMES)
@pytest.mark.parametrize("value", ["garbage_collection_threshold:0.6", ""])
def test_a_variable_the_user_set_stands(clean_env, name, value):
    clean_env.setenv(name, value)  # in the driver's environment, even empty: theirs, passed on to every node
    assert allocator_env() == {name: value}
    given = init_kwargs(RayConfig(address="10.0.0.1:6379"))["runtime_env"]["env_vars"]
    assert {k: v for k, v in given.items() if k in ALLOC_CONF_NAMES} == {name: value}
    clean_env.delenv(name)
    clean_env.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"env_vars": {name: value}}}))  # the job's
    assert allocator_env() == {}
    clean_env.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"env_vars": {"OTHER": "1"}}}))
    assert allocator_env() == EXPANDABLE


@pytest.mark.slow  # two local Rays, one after another
def test_what_the_workers_of_a_local_ray_see():
    seen = run_probe(TESTS / "worker_env_probe.py", tag="allocenv", timeout=300)
    theirs = "garbage_collection_threshold:0.6"
    assert seen["default"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": None}
    assert seen["job_runtime_env"] == {"PYTORCH_CUDA_ALLOC_CONF": theirs, "PYTORCH_ALLOC_CONF": None}
