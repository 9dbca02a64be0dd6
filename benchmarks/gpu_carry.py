"""`make gpu-carry`: build `.gpu_carry/`, the folder that brings DeepSpeed to the GPU machine (no DeepSpeed, no
network there; the device tool carries ignored paths of up to 64 MiB with the working tree).

- DeepSpeed itself is copied from this venv (same version the tests use). It ships as a source distribution only, so
  `pip install --target` would build it, and its build wants torch: copying the installed pure-Python package is
  both smaller and exact. It was installed without prebuilt ops; on the GPU the check uses none (torch AdamW, no
  offload) and refuses any JIT build (gpu_check_ds.py).
- Its requirements the GPU image lacks (hjson, pydantic with pydantic-core and their own requirements, a
  typing-extensions new enough for that pydantic) come from PyPI as wheels for the GPU machine's Python
  (--python-version, 3.12 as last seen there), at the versions installed here. The rest of DeepSpeed's requirements
  (numpy, packaging, psutil, tqdm, py-cpuinfo, msgpack, einops, ninja) are in that image already.

    python benchmarks/gpu_carry.py [--python-version 3.12] [--out .gpu_carry]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = ["hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
MAX_MIB = 40  # the working tree (~8 MiB) travels too, within 64 MiB in all


def copy_installed(name: str, out: Path) -> None:
    """The package folder and its dist-info, as installed here, without bytecode (built for this Python)."""
    dist = metadata.distribution(name)
    site = Path(dist.locate_file(""))
    top = (dist.read_text("top_level.txt") or name).split()
    info = Path(dist._path)  # noqa: SLF001 (the dist-info folder; no public accessor)
    for folder in [*(site / t for t in top), info]:
        shutil.copytree(folder, out / folder.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def pip_wheels(out: Path, python_version: str) -> None:
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp", *platforms, "--target", str(out), *pins]
    subprocess.run(cmd, check=True)


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's python3 (major.minor)")
    ap.add_argument("--out", default=str(REPO / ".gpu_carry"))
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    copy_installed("deepspeed", out)
    pip_wheels(out, args.python_version)
    shutil.rmtree(out / "bin", ignore_errors=True)  # console scripts: nothing runs them there
    tag = "cpython-" + args.python_version.replace(".", "")
    if not list((out / "pydantic_core").glob(f"*{tag}*.so")):
        print(f"no pydantic-core extension for {tag} in {out}", file=sys.stderr)
        return 1
    size = folder_mib(out)
    print(f"{out}: {size:.1f} MiB (deepspeed {metadata.version('deepspeed')}, {', '.join(WHEELS)}) for Python {tag}")
    if size > MAX_MIB:
        print(f"{out} is over {MAX_MIB} MiB: the device tool carries 64 MiB with the working tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
