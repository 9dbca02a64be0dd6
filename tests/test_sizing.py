"""The sizing table's arithmetic (benchmarks/sizing.py), checked against hand-worked numbers."""

import importlib.util
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("sizing", Path(__file__).resolve().parents[1] / "benchmarks/sizing.py")
sizing = importlib.util.module_from_spec(SPEC)
sys.modules["sizing"] = sizing  # dataclasses look their module up by name
SPEC.loader.exec_module(sizing)

CHECK = {  # the shape of benchmarks/gpu_check.py's JSON
    "environment": {"gpu": "Test GPU", "gpu_memory_bytes": 80 * 2**30},
    "ensemble": [{"rows": 100, "epochs": 2, "seconds": 10.0}, {"rows": 100, "epochs": 2, "seconds": 30.0}],
    "extraction": {"examples_per_s": 50.0, "adapters": 4},
    "memory_per_token": {"bytes_per_token": 300 * 1024},
}


def test_device_hours_and_devices_follow_the_measured_throughput():
    measured = sizing.Measured.from_check(CHECK)
    assert measured.member_examples_per_s == pytest.approx(200 / 20)  # 100 rows x 2 epochs in 20 s on average
    size = sizing.size_for(measured, examples=36_000, members=5, epochs=2, hours=4)
    assert size.ensemble_device_hours == pytest.approx(5 * 2 * 36_000 / 10 / 3600)  # 10 h
    assert size.extract_device_hours == pytest.approx(36_000 / 50 * (10 / 4) / 3600)  # 0.5 h, 10 of 4 adapters
    assert size.devices_for_deadline == 3  # 10.5 device-hours in 4 hours
    assert sizing.size_for(measured, 10, 5, 2, hours=4).devices_for_deadline == 1
    table = sizing.markdown(measured, [size], 5, 2, 4)
    assert "| 36,000 | 10.00 | 0.50 | 10.50 | 3 |" in table and "Test GPU" in table


def test_a_check_without_throughput_is_refused():
    with pytest.raises(ValueError, match="no ensemble or extraction throughput"):
        sizing.Measured.from_check({k: v for k, v in CHECK.items() if k != "extraction"})


def test_the_token_budget_fits_the_measured_memory_per_token():
    measured = sizing.Measured.from_check(CHECK)
    # 0.7 x 80 GiB / 300 KiB = 195,734 tokens -> the power of two below: 131,072
    assert measured.tokens_per_batch() == 131_072
    assert "gradients.tokens_per_batch up to 131,072" in sizing.markdown(measured, [], 5, 2, 4).replace("\n", " ")
    assert sizing.Measured.from_check({**CHECK, "memory_per_token": {}}).tokens_per_batch() is None
