"""A local output_dir must be one folder on every node: checked before the first stage on a real two-node Ray.

The two raylets run on this machine, so they do share the disk; a fault handler makes the second node miss the
sentinel as a node without the shared mount would (the check's reading, comparing and reporting run for real)."""

from __future__ import annotations

import probes
import pytest

from gradfilter_ray.shared_dir import unshared_nodes, working_nodes

pytestmark = pytest.mark.slow


def test_unshared_nodes_are_the_ones_that_did_not_see_the_token():
    results = [{"node": "a", "seen": True}, {"node": "b", "seen": False}]
    assert unshared_nodes(results) == [{"node": "b", "seen": False}]


def test_a_node_with_no_cpu_or_gpu_runs_no_stage_and_is_not_checked():
    nodes = [
        {"NodeID": "head", "Alive": True, "Resources": {"memory": 1.0}},  # a KubeRay head with num-cpus 0
        {"NodeID": "cpu", "Alive": True, "Resources": {"CPU": 16.0}},
        {"NodeID": "gpu", "Alive": True, "Resources": {"CPU": 0.0, "GPU": 8.0}},
        {"NodeID": "dead", "Alive": False, "Resources": {"CPU": 16.0}},
    ]
    assert working_nodes(nodes) == ["cpu", "gpu"]


def test_two_nodes_sharing_the_folder_pass_and_a_node_without_it_stops_the_run():
    result = probes.result("multinode")  # tests/multinode_probe.py: a two-node local Ray
    assert result["shared"] == {"nodes_checked": 2, "error": None}
    error = result["unshared"]["error"]
    assert result["unshared"]["nodes_checked"] is None and error
    assert "1 of 2 nodes do not share" in error and "FileNotFoundError" in error and "s3://" in error
    assert result["left_in_output_dir"] == []  # the sentinel is removed either way
