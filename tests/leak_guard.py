"""Leak guard: the test session fails if a process of one of its own Ray sessions outlives it.

A Ray session of the suite is known by its temp dir: the in-process `ray_cluster`'s `_temp_dir`, the RAY_TMPDIR a
test gives a CLI subprocess, the `--temp-dir` of a `ray start` head. Those dirs are registered with
`register_ray_tmp(path)`; the plugin also registers by itself every RAY_TMPDIR found in the `env` of a
`subprocess.Popen` (so `subprocess.run` too) and every `--temp-dir=` / `--temp-dir DIR` argument started from
this process.

A live process belongs to a registered dir when its environment mentions it (RAY_TMPDIR, inherited by the driver and
its workers), its command line does (gcs_server, raylet, `ray start`, dashboard, log monitor) or one of its open
file descriptors lies under it (every Ray worker and agent writes its stdout/stderr and logs into the session
dir; the dashboard and runtime-env agents run with a scrubbed environment and a `ray::...` title, so only this
finds them). Registered dirs are unique `mkdtemp` paths: a process of anyone else on the machine cannot match.

At session end (pytest_sessionfinish, after every fixture's teardown) the survivors get GFR_LEAK_GRACE_S (default
15) seconds to exit; whatever is left is printed (pid, name, cmdline, RSS, which dir, how it matched), SIGKILLed by
pid (unless GFR_LEAK_KEEP=1, to inspect them) and the run fails (exit status 1).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable

_REGISTERED: dict[str, None] = {}  # insertion-ordered set of temp dirs (as given and as resolved)
_PATH_CHARS = re.compile(r"[A-Za-z0-9_.\-]")


def register_ray_tmp(path) -> str:
    """Record a Ray temp dir of this test session (RAY_TMPDIR, `_temp_dir`, `--temp-dir`); returns it unchanged."""
    text = os.fspath(path)
    for form in (text, os.path.realpath(text)):
        form = form.rstrip("/")
        if form and form != "/" and os.path.isabs(form):
            _REGISTERED[form] = None
    return path


def registered() -> list[str]:
    return list(_REGISTERED)


def _mentions(text: str, folder: str) -> bool:
    """`folder` occurs in `text` as a whole path (not as a prefix of a longer name: /tmp/gfr-a vs /tmp/gfr-ab)."""
    start = text.find(folder)
    while start != -1:
        end = start + len(folder)
        if end == len(text) or not _PATH_CHARS.match(text[end]):
            return True
        start = text.find(folder, start + 1)
    return False


def fd_targets(pid: int) -> list[str]:
    """What the process's open file descriptors point at (paths, `socket:[inode]`, ...); [] when unreadable."""
    folder = f"/proc/{pid}/fd"
    targets = []
    try:
        names = os.listdir(folder)
    except OSError:
        return targets
    for name in names:
        try:
            targets.append(os.readlink(f"{folder}/{name}"))
        except OSError:
            continue
    return targets


def match(proc, folders: Iterable[str]) -> tuple[str, str] | None:
    """(folder, how) when this psutil.Process belongs to one of the folders, else None. Zombies never match."""
    import psutil

    folders = [f.rstrip("/") for f in folders]
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        environ = proc.environ()
        cmdline = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return None
    fds = None
    for folder in folders:
        if environ.get("RAY_TMPDIR", "").rstrip("/") == folder or any(_mentions(v, folder) for v in environ.values()):
            return folder, "environ"
        if _mentions(cmdline, folder):
            return folder, "cmdline"
        if fds is None:
            fds = fd_targets(proc.pid)
        if any(_mentions(target, folder) for target in fds):
            return folder, "open file"
    return None


def _self_and_ancestors() -> set[int]:
    """This process and its ancestors (pytest, make, a shell, `timeout`): never a leak, whatever their environment."""
    import psutil

    pids = {os.getpid()}
    try:
        pids.update(p.pid for p in psutil.Process().parents())
    except psutil.Error:
        pass
    return pids


def processes_in(folders: Iterable[str]) -> list[tuple[object, str, str]]:
    """[(psutil.Process, folder, how)] for every live process (but this one and its ancestors) that belongs to one
    of the folders."""
    import psutil

    folders = [f.rstrip("/") for f in folders if f]
    if not folders:
        return []
    found = []
    mine = _self_and_ancestors()
    for proc in psutil.process_iter():
        if proc.pid in mine:
            continue
        hit = match(proc, folders)
        if hit:
            found.append((proc, *hit))
    return found


def describe(proc) -> dict:
    import psutil

    facts = {"pid": proc.pid}
    for key, get in (
        ("name", proc.name),
        ("cmdline", lambda: " ".join(proc.cmdline()).strip()[:200]),
        ("rss_mb", lambda: round(proc.memory_info().rss / 2**20)),
        ("ppid", proc.ppid),
        ("age_s", lambda: round(time.time() - proc.create_time())),
    ):
        try:
            facts[key] = get()
        except (psutil.Error, OSError):
            facts[key] = "?"
    return facts


def survivors(folders: Iterable[str], grace_s: float) -> list[tuple[object, str, str]]:
    """The processes of these folders still alive after up to grace_s seconds."""
    deadline = time.monotonic() + grace_s
    while True:
        left = processes_in(folders)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


# ----- automatic registration: RAY_TMPDIR / --temp-dir of the subprocesses this test process starts -----

_ORIGINAL_POPEN_INIT = subprocess.Popen.__init__


def _register_from_popen(args, kwargs) -> None:
    env = kwargs.get("env")
    if env and env.get("RAY_TMPDIR"):
        register_ray_tmp(env["RAY_TMPDIR"])
    argv = args[0] if args else kwargs.get("args")
    if isinstance(argv, (list, tuple)):
        argv = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in argv]
        for k, arg in enumerate(argv):
            if isinstance(arg, str) and arg.startswith("--temp-dir="):
                register_ray_tmp(arg.split("=", 1)[1])
            elif arg == "--temp-dir" and k + 1 < len(argv) and isinstance(argv[k + 1], str):
                register_ray_tmp(argv[k + 1])


def _popen_init(self, *args, **kwargs):
    try:
        _register_from_popen(args, kwargs)
    except Exception:  # never let bookkeeping break a test's subprocess
        pass
    _ORIGINAL_POPEN_INIT(self, *args, **kwargs)


# ----- pytest hooks -----


def pytest_configure(config):
    if subprocess.Popen.__init__ is _ORIGINAL_POPEN_INIT:
        subprocess.Popen.__init__ = _popen_init


def pytest_unconfigure(config):
    if subprocess.Popen.__init__ is _popen_init:
        subprocess.Popen.__init__ = _ORIGINAL_POPEN_INIT


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput") or not _REGISTERED:  # an xdist worker, or no Ray started
        return
    import psutil

    grace_s = float(os.environ.get("GFR_LEAK_GRACE_S", "15"))
    left = survivors(registered(), grace_s)
    if not left:
        return
    lines = [f"{len(left)} process(es) of this test session's own Ray sessions outlived it (after {grace_s:g} s):"]
    for proc, folder, how in left:
        facts = describe(proc)
        lines.append(
            f"  pid {facts['pid']} ({facts['name']}, ppid {facts['ppid']}, {facts['rss_mb']} MB RSS, "
            f"{facts['age_s']} s old) of {folder} by its {how}: {facts['cmdline']}"
        )
    keep = os.environ.get("GFR_LEAK_KEEP") == "1"
    if not keep:
        for proc, _, _ in left:
            try:
                proc.kill()  # by pid, and only a process proven ours above
            except psutil.Error:
                pass
        psutil.wait_procs([p for p, _, _ in left], timeout=10)
    lines.append("  (left running: GFR_LEAK_KEEP=1)" if keep else "  (now SIGKILLed by pid)")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", "leaked processes", red=True, bold=True)
        for line in lines:
            reporter.write_line(line)
    else:
        print("\n".join(lines), file=sys.stderr)
    session.exitstatus = 1
