"""Pure cores stay framework-free: no core module imports ray (checked in a fresh interpreter)."""

import subprocess
import sys

CORE_MODULES = [
    "gradfilter_ray.config",
    "gradfilter_ray.rundir",
    "gradfilter_ray.models",
    "gradfilter_ray.pipeline",
    "gradfilter_ray.data.formats",
    "gradfilter_ray.data.sources",
    "gradfilter_ray.data.finalize",
    "gradfilter_ray.data.prompt",
    "gradfilter_ray.gradients.norms",
    "gradfilter_ray.losses",
    "gradfilter_ray.ensemble.lora",
    "gradfilter_ray.ensemble.loop",
    "gradfilter_ray.scoring.gsnr",
    "gradfilter_ray.scoring.baselines",
    "gradfilter_ray.scoring.selection",
    "gradfilter_ray.target.ds_config",
    "gradfilter_ray.target.loop",
    "gradfilter_ray.target.model",
    "gradfilter_ray.evaluation.generate",
    "gradfilter_ray.evaluation.judge",
    "gradfilter_ray.evaluation.pws",
    "gradfilter_ray.evaluation.testsets",
    "gradfilter_ray.evaluation.compare",
    "gradfilter_ray.parquet_stream",
]


def test_core_modules_do_not_import_ray():
    code = (
        "import sys, importlib\n"
        f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
