"""Probe for test_worker_env.py: the allocator variables a Ray worker of the job sees, for a driver opened with
runtime.init_kwargs on its own local Ray, twice: nothing set by the user; the variable in the runtime_env of a
`ray job submit` job (handed to the driver as Ray's job manager does, so Ray merges it with ray.init's). A value in
the driver's environment travels the first one's way (ray.init's env_vars: test_worker_env's unit tests).
Prints one JSON line: scenario -> what the worker saw."""

from __future__ import annotations

import json
import os

import ray

from gradfilter_ray.config import RayConfig
from gradfilter_ray.runtime import ALLOC_CONF_NAMES, JOB_CONFIG_ENV, init_kwargs

THEIRS = "garbage_collection_threshold:0.6"


@ray.remote(num_cpus=0)
def seen() -> dict:
    return {name: os.environ.get(name) for name in ALLOC_CONF_NAMES}


def worker_env(**driver_env: str) -> dict:
    for name, value in driver_env.items():
        os.environ[name] = value
    try:
        ray.init(**init_kwargs(RayConfig(num_cpus=1, log_level="ERROR")))
        return ray.get(seen.remote())
    finally:
        ray.shutdown()
        for name in driver_env:
            del os.environ[name]


def main() -> None:
    for name in (*ALLOC_CONF_NAMES, JOB_CONFIG_ENV):
        os.environ.pop(name, None)
    job = {"runtime_env": {"env_vars": {"PYTORCH_CUDA_ALLOC_CONF": THEIRS}}}
    print(
        json.dumps(
            {
                "default": worker_env(),
                "job_runtime_env": worker_env(**{JOB_CONFIG_ENV: json.dumps(job)}),
            }
        )
    )


if __name__ == "__main__":
    main()
