"""An extraction actor SIGKILLed mid-stream (in the faulted run's resumed driver, held in its second shard by the
fault handler) is restarted by Ray Data: its shards run again on a new actor, every id appears exactly once and
every value equals the fault-free reference run's (same config, uninterrupted)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_runs import int_lines

from gradfilter_ray.rundir import RunDir

pytestmark = pytest.mark.slow
GRADIENT_COLUMNS = ("sq_norm_early", "sq_norm_late", "loss_early", "loss_late", "ifd_loss_cond", "ifd_loss_uncond")


@pytest.fixture(scope="module")
def resumed(faulted_run):
    """The resumed run, which must have finished: the checks on its outputs fail with its log otherwise."""
    if faulted_run["second_rc"] != 0:
        pytest.fail("the resumed run failed:\n" + faulted_run["second_log"][-4000:])
    return faulted_run


def test_the_killed_actor_is_replaced_and_its_shards_run_again(resumed):
    victim = resumed["victim"]
    calls = int_lines(resumed["second_dir"] / "calls.log")
    assert [call for pid, call, _ in calls if pid == victim] == [1, 2]  # it died inside its second shard
    restarted = {pid for pid, _, _ in calls} - {victim}
    assert len(restarted) == 1, calls  # a new actor process took over and processed the shards again
    assert len([1 for pid, _, _ in calls if pid in restarted]) >= 2
    [died_in] = [shard for pid, call, shard in calls if pid == victim and call == 2]
    assert died_in in [shard for pid, _, shard in calls if pid in restarted]  # the shard in flight ran again


def test_every_id_once_and_values_equal_the_fault_free_run(resumed, reference_run):
    assert reference_run["rc"] == 0, reference_run["log"][-4000:]
    got = pq.read_table(RunDir(str(resumed["out"])).gradients).sort_by("id")
    expected = pq.read_table(RunDir(str(reference_run["out"])).gradients).sort_by("id")
    np.testing.assert_array_equal(got["id"].to_numpy(), expected["id"].to_numpy())  # every id exactly once
    assert len(np.unique(got["id"].to_numpy())) == got.num_rows
    for column in GRADIENT_COLUMNS:
        np.testing.assert_allclose(
            np.array(got[column].to_pylist(), dtype=float),
            np.array(expected[column].to_pylist(), dtype=float),
            rtol=1e-5,
            atol=1e-10,
            equal_nan=True,
            err_msg=column,
        )
    assert (np.array(got["sq_norm_late"].to_pylist()) > 0).all()
