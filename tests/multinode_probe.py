"""Run as a script by tests/test_shared_output_dir.py: a two-node local Ray (ray.cluster_utils.Cluster: two raylets
on this machine, on the RAY_TMPDIR the test gives) and the output_dir check on it, once as it is (both nodes share
the disk) and once with a fault handler that makes every node but the driver's miss the sentinel, as a node without
the shared mount would. Prints one JSON line with both outcomes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from gradfilter_ray.shared_dir import OutputDirNotShared, check_output_dir_shared
from gradfilter_ray.storage import open_location

HANDLER = {"GFR_FAULT_HANDLER": "multinode_probe:hide_sentinel_off_the_driver_node"}


def hide_sentinel_off_the_driver_node(name: str, **context) -> None:
    if name == "output_dir.node_check" and context["node"] != context["driver_node"]:
        raise FileNotFoundError("no such file (this node does not mount the shared folder)")


def check(address: str, root, env: dict | None) -> dict:
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, logging_level="ERROR")
    try:
        return {"nodes_checked": check_output_dir_shared(root), "error": None}
    except OutputDirNotShared as exc:
        return {"nodes_checked": None, "error": str(exc)}
    finally:
        ray.shutdown()


def main(output_dir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        root = open_location(output_dir)
        shared = check(cluster.address, root, None)
        path = os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])
        unshared = check(cluster.address, root, {**HANDLER, "PYTHONPATH": path})
        left = sorted(p.name for p in Path(output_dir).rglob("*"))
    finally:
        cluster.shutdown()
    print(json.dumps({"shared": shared, "unshared": unshared, "left_in_output_dir": left}))


if __name__ == "__main__":
    main(sys.argv[1])
