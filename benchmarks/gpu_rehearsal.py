"""`make gpu-rehearsal`: the GPU check rehearsed on CPU against nothing but what the GPU machine is said to have.

1. A fresh venv (`.gpu_rehearsal/venv`, kept out of git by the folder's own .gitignore) holding
   benchmarks/gpu_image.txt alone: no Ray, no DeepSpeed, no ninja, no project install. It is reused while that file
   and the Python are the same (their hash is kept in the venv), rebuilt from scratch otherwise.
2. The carry built by benchmarks/gpu_carry.py for that venv's Python (`--python-version`), as `make gpu-carry`
   builds it for the GPU machine's.
3. A copy of what the device tool sends (the tracked and the untracked-but-not-ignored files, `git ls-files`), with
   the carry as `.gpu_carry/` in it: a file the check needs but git ignores is missing here too.
4. The check's CPU mode (`python3 benchmarks/gpu_check.py --smoke`) run in that copy by the venv's python, with a
   bare environment (no PYTHONPATH: the check must find `.gpu_carry/` itself), OUT set to a fresh folder, an empty
   Hugging Face cache, and no network (its own network namespace, loopback only, where `unshare` is allowed).
5. Assertions from the JSON: every step ran and passed (none skipped, none failed), the DeepSpeed target step
   included; DeepSpeed and its requirements imported from the carry; the sizing table written into OUT.

It downloads the image's packages on its first run (or after gpu_image.txt changes), so the test suite does not run
it. The image's Python is 3.12; this machine's registry has no CPU build of torch for it, so the rehearsal runs 3.11
(see gpu_image.txt), and the carry for the GPU machine is built separately, for 3.12.

    python benchmarks/gpu_rehearsal.py [--python /path/to/python3.11] [--root .gpu_rehearsal]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGE = HERE / "gpu_image.txt"
FROM_CARRY = ("deepspeed", "pydantic", "msgpack", "hjson", "einops")
STEPS = ("ensemble", "extraction", "memory_per_token", "accuracy", "batched_vs_loop", "target")


def say(line: str) -> None:
    print(f"[rehearsal] {line}", flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def python_version(python: Path | str) -> str:
    out = run([str(python), "-c", "import platform; print(platform.python_version())"], capture_output=True)
    return out.stdout.strip()


def image_venv(root: Path, python: str) -> Path:
    """The venv holding gpu_image.txt alone, rebuilt when the file or the Python changed."""
    venv = root / "venv"
    stamp = venv / "gpu_image.sha256"
    digest = hashlib.sha256(IMAGE.read_bytes() + python_version(python).encode()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == digest:
        say(f"venv {venv} up to date with {IMAGE.name} ({digest[:12]})")
        return venv
    say(f"building {venv} from {IMAGE.name} (downloads the image's packages)")
    shutil.rmtree(venv, ignore_errors=True)
    t0 = time.perf_counter()
    run([python, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(IMAGE)])
    stamp.write_text(digest + "\n")
    say(f"venv built in {time.perf_counter() - t0:.0f}s")
    return venv


def tree_copy(dest: Path) -> int:
    """What the device tool sends: tracked files and untracked files git does not ignore."""
    shutil.rmtree(dest, ignore_errors=True)
    listed = run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True
    ).stdout.split("\0")
    copied = 0
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the working tree is not sent either
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
            copied += 1
    return copied


def no_network_prefix() -> list[str]:
    """Run in a network namespace of its own with loopback up (DeepSpeed's gloo world needs 127.0.0.1), where this
    machine allows it; else as is (said so)."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare and ip:
        probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"], capture_output=True)
        if probe.returncode == 0:
            return [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh"]
    say("unshare -n is not allowed here: the check runs with this machine's network")
    return []


def assert_report(report: dict, out: Path) -> list[str]:
    """What the rehearsal must see; returns the problems (empty: passed)."""
    problems = []
    for step in STEPS:
        result = report.get(step)
        if result is None:
            problems.append(f"{step}: did not run")
        elif isinstance(result, dict) and ("skipped" in result or "error" in result):
            problems.append(f"{step}: {result.get('skipped') or result.get('error')}")
    failed_checks = sorted(k for k, v in report.get("checks", {}).items() if not v)
    if failed_checks:
        problems.append(f"checks failed: {failed_checks}")
    imports = report.get("preflight", {}).get("imports", {})
    for name in FROM_CARRY:
        origin = imports.get(name, {}).get("from")
        if origin != "carry":
            problems.append(f"{name} imported from {origin}, not from the carry")
    target = report.get("target", {})
    if not isinstance(target, dict) or not {"train", "checkpoint", "final_save", "generation"} <= set(target):
        problems.append("the target step has no train/checkpoint/final_save/generation numbers")
    if not (out / "sizing.md").is_file() or not report.get("sizing", {}).get("built"):
        problems.append(f"no sizing table in {out}: {report.get('sizing')}")
    if report.get("verdict") != "PASS":
        problems.append(f"verdict {report.get('verdict')!r}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=getattr(sys, "_base_executable", sys.executable), help="the venv's Python")
    ap.add_argument("--root", default=str(REPO / ".gpu_rehearsal"))
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    (root / ".gitignore").write_text("*\n")  # nothing here is git's, nor the device tool's
    started = time.perf_counter()

    venv = image_venv(root, args.python)
    python = venv / "bin" / "python"
    version = python_version(python)
    major_minor = ".".join(version.split(".")[:2])
    for absent in ("deepspeed", "ninja", "ray"):
        if subprocess.run([str(python), "-c", f"import {absent}"], capture_output=True).returncode == 0:
            say(f"FAIL: {absent} is importable in the image venv: gpu_image.txt must not bring it")
            return 1
    say(f"image venv: Python {version}, without deepspeed, ninja or ray")

    tree = root / "tree"
    say(f"copied {tree_copy(tree)} files (what the device tool sends) to {tree}")
    carry = tree / ".gpu_carry"
    run([sys.executable, str(HERE / "gpu_carry.py"), "--python-version", major_minor, "--out", str(carry)])

    out = Path(tempfile.mkdtemp(prefix="gpu-rehearsal-out-"))
    hf_home = Path(tempfile.mkdtemp(prefix="gpu-rehearsal-hf-"))
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "OUT": str(out),
        "HF_HOME": str(hf_home),
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [*no_network_prefix(), str(python), "benchmarks/gpu_check.py", "--smoke"]
    say(f"running {' '.join(cmd[-3:])} in {tree} with OUT={out}")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, text=True, capture_output=True, timeout=900)
    check_s = time.perf_counter() - t0
    (root / "last.log").write_text(done.stdout + done.stderr)
    print(done.stdout, end="")
    shutil.rmtree(hf_home, ignore_errors=True)
    report_path = out / "gpu_check.smoke.json"
    if not report_path.is_file():
        print(done.stderr[-4000:], file=sys.stderr)
        say(f"FAIL: no {report_path.name} in OUT (exit {done.returncode})")
        return 1
    report = json.loads(report_path.read_text())
    shutil.copy2(report_path, root / "last.json")
    problems = assert_report(report, out)
    if done.returncode != 0:
        problems.append(f"gpu_check.py exited {done.returncode}")
    manifest = json.loads((carry / "manifest.json").read_text())
    say(f"carry: {manifest['mib']} MiB for Python {manifest['python']}: "
        + ", ".join(f"{e['name']} {e['version']}" for e in manifest["carried"]))  # fmt: skip
    say("step seconds: " + ", ".join(f"{k} {v}" for k, v in report.get("step_seconds", {}).items()))
    say(f"OUT holds {sorted(p.name for p in out.iterdir())}")
    if problems:
        print(done.stderr[-4000:], file=sys.stderr)
        for p in problems:
            say(f"FAIL: {p}")
        return 1
    say(f"PASS: every step ran, target included; check {check_s:.0f}s, rehearsal {time.perf_counter() - started:.0f}s")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
