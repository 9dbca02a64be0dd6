"""One driver per output_dir: a claim object (host, pid, start time, heartbeat) in the run directory.

A second driver stops with an error naming the first while the first is alive. A claim is alive while its
heartbeat is fresh and, on this host, its process still runs: a driver killed on this host is taken over at once,
one on another host once its heartbeat is older than `ttl_s`. Object stores offer pyarrow no conditional PUT, so
taking a claim is write-then-read-back after a short settle: two drivers that start within the same instant are
told apart by whose write landed last (best effort; the common case, a retried RayJob whose first driver still runs,
is always caught because that driver's claim is already there).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from gradfilter_ray.storage import Location

CLAIM_FILE = "driver_claim.json"
TTL_S = 120.0
HEARTBEAT_S = 20.0
SETTLE_S = 0.5


class OutputDirInUse(RuntimeError):
    pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_is_live(claim: dict, now: float, host: str, ttl_s: float) -> bool:
    """Pure rule: fresh heartbeat, and (on this host) a process that still runs."""
    if now - float(claim.get("heartbeat", 0)) > ttl_s:
        return False
    return claim.get("host") != host or pid_alive(int(claim.get("pid", -1)))


def describe(claim: dict) -> str:
    return f"host {claim.get('host')}, pid {claim.get('pid')}, started {claim.get('started')}"


@dataclass
class DriverClaim:
    """Held for the life of a driver: `with DriverClaim(root): ...`; a thread refreshes the heartbeat."""

    root: Location
    ttl_s: float = TTL_S
    heartbeat_s: float = HEARTBEAT_S
    settle_s: float = SETTLE_S

    def __post_init__(self) -> None:
        self.where = self.root / CLAIM_FILE
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.record = {
            "host": self.host,
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "token": self.token,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_to: dict | None = None  # the claim that replaced ours (a store outage longer than ttl_s)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.where.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write(self) -> None:
        self.where.write_text(json.dumps({**self.record, "heartbeat": time.time(), "ttl_s": self.ttl_s}))

    def _refuse_if_held(self) -> None:
        other = self._read()
        if other and other.get("token") != self.token and claim_is_live(other, time.time(), self.host, self.ttl_s):
            raise OutputDirInUse(
                f"{self.root} is in use by another driver ({describe(other)}); wait for it to finish or stop it. "
                f"A dead driver's claim expires (at once on the same host, after {self.ttl_s:.0f} s elsewhere)."
            )

    def acquire(self) -> DriverClaim:
        self._refuse_if_held()
        self._write()
        time.sleep(self.settle_s)
        self._refuse_if_held()
        self._thread = threading.Thread(target=self._beat, name="gfr-driver-claim", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self.beat():
            pass

    def beat(self) -> bool:
        """Refresh the heartbeat unless another driver has taken the claim over; False once it has."""
        try:
            current = self._read()
            if current and current.get("token") != self.token:
                self.lost_to = current  # never overwrite another driver's claim: stop and let check() say so
                return False
            self._write()
        except OSError:  # a store hiccup: the next beat retries; the claim lives ttl_s beyond the last one
            pass
        return True

    def check(self) -> None:
        """Raise if another driver has taken the output_dir over (called before every manifest write)."""
        if self.lost_to is not None:
            raise OutputDirInUse(f"{self.root}: this driver lost its claim to another ({describe(self.lost_to)})")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = self._read()
            if current and current.get("token") == self.token:
                self.where.delete()
        except OSError:  # the claim then expires by itself; a finished run must not fail on its way out
            pass

    def __enter__(self) -> DriverClaim:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
