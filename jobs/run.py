"""Entry point for Ray jobs: `ray job submit --working-dir . -- python jobs/run.py --config jobs/configs/X.yaml`.

Same code path as `gradfilter-ray`: with only options it runs the whole pipeline (`run`), otherwise the first
argument names a stage (`python jobs/run.py gradients --config ...`). Under `ray job submit` RAY_ADDRESS is set, so
the pipeline attaches to the cluster instead of starting an embedded Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

# With --working-dir the package is uploaded beside this script, not installed: make it importable either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradfilter_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.argv.insert(1, "run")
    sys.exit(main())
