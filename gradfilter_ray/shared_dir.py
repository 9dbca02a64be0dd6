"""Fail fast when a local `output_dir` is not the same folder on every node of the cluster.

Stages write from whichever node their workers land on, and read what other nodes wrote: a local path that is not a
shared mount would fail hours later (an extraction actor that cannot find the adapters, a scoring task that sees half
of `gradients/`). Before the first stage the driver writes a sentinel holding a random token into `output_dir`, and
one zero-CPU task pinned to every live node reads it back; a node that does not see it stops the run with a clear
error. Object-store URIs reach every node by construction and are not checked. Nodes that join later (autoscaling)
are not covered: mount the folder in the node image.
"""

from __future__ import annotations

import os
import socket
import uuid

from gradfilter_ray.faults import fault_point
from gradfilter_ray.storage import Location

SENTINEL_DIR = ".node_check"
CHECK_TIMEOUT_S = 120.0


class OutputDirNotShared(RuntimeError):
    pass


def read_sentinel(sentinel: Location, token: str, driver_node: str) -> dict:
    """On one node: does `sentinel` hold `token` there?"""
    import ray

    node = ray.get_runtime_context().get_node_id()
    host = socket.gethostname()
    try:
        fault_point("output_dir.node_check", node=node, driver_node=driver_node, pid=os.getpid())
        seen = sentinel.exists() and sentinel.read_text() == token
        error = None if seen else "the sentinel is not there"
    except OSError as exc:
        seen, error = False, f"{type(exc).__name__}: {exc}"
    return {"node": node, "host": host, "seen": seen, "error": error}


def unshared_nodes(results: list[dict]) -> list[dict]:
    return [r for r in results if not r["seen"]]


def working_nodes(nodes: list[dict]) -> list[str]:
    """Live nodes that can run a stage's work (some CPU or GPU): a KubeRay head started with num-cpus 0 runs none,
    so whether it mounts the folder does not matter."""
    return [
        n["NodeID"]
        for n in nodes
        if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)
    ]


def check_output_dir_shared(root: Location, log=print) -> int:
    """Raise `OutputDirNotShared` unless every live working node sees `root` (a local folder) as the driver does;
    returns the number of nodes that answered (0 for an object store or a single-node Ray). A node that does not
    answer within CHECK_TIMEOUT_S (dying, or still starting its workers) is reported, not waited for."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not root.is_local:
        return 0
    nodes = working_nodes(ray.nodes())
    if len(nodes) < 2:
        return 0
    token = uuid.uuid4().hex
    folder = root / SENTINEL_DIR
    sentinel = folder / f"{token}.txt"
    sentinel.write_text(token)
    driver_node = ray.get_runtime_context().get_node_id()
    task = ray.remote(read_sentinel)
    try:
        refs = {
            task.options(
                num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(sentinel, token, driver_node): node
            for node in nodes
        }
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=CHECK_TIMEOUT_S)
        results, silent = [], [refs[ref] for ref in pending]
        for ref in ready:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as exc:  # the node died, or the task could not be placed on it
                silent.append(f"{refs[ref]} ({type(exc).__name__})")
        for ref in pending:
            ray.cancel(ref, force=True)
    finally:
        folder.delete()  # one driver per output_dir (driver_claim): no other check is using it
    if silent:
        log(f"warning: output_dir check: no answer from node(s) {', '.join(s[:40] for s in silent)}; not checked")
    missing = unshared_nodes(results)
    if missing:
        listed = "; ".join(f"{r['host']} (node {r['node'][:12]}): {r['error']}" for r in missing)
        raise OutputDirNotShared(
            f"output_dir {root} is a local path that {len(missing)} of {len(results)} nodes do not share ({listed}). "
            "Every node must reach it: mount the same shared filesystem at this path on every node, or use an "
            "object-store URI (s3://bucket/prefix)."
        )
    return len(results)
