"""`make gpu-carry`: build `.gpu_carry/`, the folder that brings DeepSpeed and everything it needs to the GPU machine
(no DeepSpeed and no network there; the device tool carries ignored paths of up to 64 MiB with the working tree).

What goes in is derived, not hand-kept: DeepSpeed's requirements as its installed metadata lists them
(`importlib.metadata.requires`), followed through the requirements of whatever gets carried, minus what
`benchmarks/gpu_image.txt` says the machine has. A requirement the image has is still carried when the image's pinned
version fails its specifier, or when the image's version is not known (unpinned there) and the specifier bounds it:
the check puts the carry first on sys.path, so the carried copy is the one imported.

- DeepSpeed itself is copied from this venv (the version the tests use). It ships as a source distribution only, so
  `pip install --target` would build it, and its build wants torch: copying the installed pure-Python package is
  both smaller and exact. It was installed without prebuilt ops; on the GPU the check uses none (torch AdamW, no
  offload) and refuses any JIT build (gpu_check_ds.py).
- Everything else comes from PyPI as wheels for the target Python (`--python-version`; msgpack and pydantic-core are
  compiled), at the versions installed here where such a wheel exists, else the newest wheel the specifier allows.
- Not carried: see NOT_CARRIED.
`.gpu_carry/manifest.json` records what was carried, why, and for which Python (the check's preflight prints it).

    python benchmarks/gpu_carry.py [--python-version 3.12] [--out .gpu_carry]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGE = HERE / "gpu_image.txt"
ROOTS = ("deepspeed",)  # what the check imports that the image lacks; their requirements follow
COPIED = {"deepspeed"}  # source distributions: copied as installed here (see the module docstring)
NOT_CARRIED = {
    # DeepSpeed runs the ninja binary only to JIT-build an op (torch's cpp_extension checks for it then); no import of
    # deepspeed or of its training path touches it, and the check refuses every build. The rehearsal runs without it.
    "ninja": "only a JIT op build runs it, and the check refuses those",
    "torch": "the image's CUDA build is the one to use",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
MAX_MIB = 40  # the working tree (~12 MiB) travels too, within 64 MiB in all


def read_image(path: Path = IMAGE) -> dict[str, Version | None]:
    """gpu_image.txt -> {canonical name: pinned version, or None when unpinned}."""
    image: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        pins = [s for s in req.specifier if s.operator == "=="]
        image[canonicalize_name(req.name)] = Version(pins[0].version) if pins else None
    return image


def target_markers(python_version: str) -> dict[str, str]:
    """Marker values of the GPU machine (Linux x86-64 CPython at `python_version`), not of this one."""
    env = dict(default_environment())
    env.update(
        python_version=python_version,
        python_full_version=f"{python_version}.0",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    return env


def requirements_of(name: str, markers: dict[str, str]) -> list[Requirement]:
    """A distribution's own requirements (no extras) that apply on the target machine."""
    out = []
    for text in metadata.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({**markers, "extra": ""}):
            out.append(req)
    return out


def plan(image: dict[str, Version | None], python_version: str) -> tuple[list[dict], list[dict]]:
    """(carried, left) over the closure of ROOTS' requirements: each carried entry with its version here and why,
    each left-out requirement with why."""
    markers = target_markers(python_version)
    queue = [Requirement(root) for root in ROOTS]
    carried: dict[str, dict] = {}
    left: dict[str, dict] = {}
    while queue:
        req = queue.pop(0)
        name = canonicalize_name(req.name)
        if name in carried:
            continue
        spec = str(req.specifier)
        if name in NOT_CARRIED:
            left.setdefault(name, {"name": name, "why": NOT_CARRIED[name]})
            continue
        why = None
        if name in ROOTS:
            why = "what the check needs"
        elif name not in image:
            why = f"not in the image (needed as {req})"
        elif image[name] is None and spec:
            why = f"the image's version is not known, and {req} bounds it"
        elif image[name] is not None and not req.specifier.contains(image[name], prereleases=True):
            why = f"the image's {image[name]} fails {req}"
        if why is None:
            have = image[name] or "unpinned"
            left.setdefault(name, {"name": name, "why": f"in the image ({have}; needed as {req})"})
            continue
        left.pop(name, None)
        version = metadata.version(name)
        if not req.specifier.contains(version, prereleases=True):
            raise SystemExit(f"{name} {version} installed here fails {req}: fix this venv first")
        carried[name] = {"name": name, "version": version, "specifier": spec, "why": why}
        queue.extend(requirements_of(name, markers))
    return list(carried.values()), list(left.values())


def copy_installed(name: str, out: Path) -> None:
    """The package folder and its dist-info, as installed here, without bytecode (built for this Python)."""
    dist = metadata.distribution(name)
    site = Path(dist.locate_file(""))
    top = (dist.read_text("top_level.txt") or name).split()
    info = Path(dist._path)  # noqa: SLF001 (the dist-info folder; no public accessor)
    for folder in [*(site / t for t in top), info]:
        shutil.copytree(folder, out / folder.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def pip_wheel(out: Path, python_version: str, pin: str) -> bool:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp", *platforms, "--target", str(out), pin]
    return subprocess.run(cmd, capture_output=True, text=True).returncode == 0


def version_in(folder: Path, name: str) -> str:
    for dist in metadata.distributions(path=[str(folder)]):
        if canonicalize_name(dist.metadata["Name"]) == name:
            return dist.version
    raise SystemExit(f"{name} was installed into {folder} but has no dist-info there")


def compiled_for(out: Path) -> dict[str, list[str]]:
    """Extension modules in the carry by CPython tag ('abi3' for the stable ABI)."""
    tags: dict[str, list[str]] = {}
    for so in out.rglob("*.so"):
        m = re.search(r"\.(cpython-\d+|abi3)", so.name)
        tags.setdefault(m.group(1) if m else "untagged", []).append(str(so.relative_to(out)))
    return tags


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def build(out: Path, python_version: str, image_file: Path = IMAGE) -> dict:
    carried, left = plan(read_image(image_file), python_version)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for entry in carried:
        if entry["name"] in COPIED:
            copy_installed(entry["name"], out)
            entry["from"] = "this venv"
        elif pip_wheel(out, python_version, f"{entry['name']}=={entry['version']}"):
            entry["from"] = "wheel at the version installed here"
        elif pip_wheel(out, python_version, f"{entry['name']}{entry['specifier']}"):
            entry["from"] = f"wheel, none at {entry['version']} (installed here): the newest the specifier allows"
            entry["version"] = version_in(out, entry["name"])
        else:
            raise SystemExit(f"no wheel of {entry['name']}{entry['specifier']} for CPython {python_version}")
    shutil.rmtree(out / "bin", ignore_errors=True)  # console scripts: nothing runs them there
    tag = "cpython-" + python_version.replace(".", "")
    compiled = compiled_for(out)
    manifest = {
        "python": python_version,
        "carried": carried,
        "left_out": left,
        "compiled": {k: len(v) for k, v in compiled.items()},
        "mib": round(folder_mib(out), 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    wrong = sorted(set(compiled) - {tag, "abi3"})
    if wrong:
        raise SystemExit(f"{out}: extension modules for {wrong}, not {tag}: {compiled}")
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's python3 (major.minor)")
    ap.add_argument("--out", default=str(REPO / ".gpu_carry"))
    ap.add_argument("--image", default=str(IMAGE), help="the packages the machine has (gpu_image.txt)")
    args = ap.parse_args()
    out = Path(args.out)
    manifest = build(out, args.python_version, Path(args.image))
    for entry in manifest["carried"]:
        print(f"  carried {entry['name']} {entry['version']}: {entry['why']}")
    for entry in manifest["left_out"]:
        print(f"  not carried {entry['name']}: {entry['why']}")
    print(f"{out}: {manifest['mib']} MiB for CPython {args.python_version}, extensions {manifest['compiled']}")
    if manifest["mib"] > MAX_MIB:
        print(f"{out} is over {MAX_MIB} MiB: the device tool carries 64 MiB with the working tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
