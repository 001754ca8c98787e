"""One writer per model: a lease object, taken with a conditional write, kept alive by a heartbeat.

A run that writes a model's artifacts first creates `models/<slug>/<revision>/lease.json`
(create-if-absent: exactly one of several runs gets it). A second run of the same model finds it
held and fails with a one-line error naming the holder (or waits for it with `wait_s`). The
holder renews the lease's expiry from a background thread; a lease whose holder is gone (its
expiry has passed, or it names a process on this host that no longer exists) is taken over with
a conditional replace, so a killed run never blocks the next one for long. The lease is deleted
when the run ends, whatever its outcome.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from weightsmith.errors import WeightsmithError
from weightsmith.model import ModelRef
from weightsmith.store.store import dumps

LEASE = "lease.json"
TTL_S = 120.0  # a holder that stopped renewing for this long is gone
POLL_S = 0.5
# Run ids whose lease this process holds. A lease naming this process and a run not in here was
# released, but its deletion failed (the store was down): it is gone, not held.
_HELD: set[str] = set()


@dataclass
class Lease:
    """A held lease; `release()` (or leaving the `with` block) gives it back."""

    model: ModelRef
    run_id: str
    ttl_s: float = TTL_S
    _data: bytes = b""
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    lost: str | None = None  # why the lease was lost (another run took it over), else None

    @property
    def key(self) -> str:
        return self.model.key(LEASE)

    def _body(self) -> bytes:
        now = time.time()
        return dumps(
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "renewed": now,
                "expires": now + self.ttl_s,
            }
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            with self._lock:
                new = self._body()
                try:
                    if self.model.store.replace_if_match(self.key, new, self._data):
                        self._data = new
                        continue
                except Exception:  # a storage hiccup: try again at the next beat
                    continue
                self.lost = "another run took this model's lease over"
                return

    def check(self) -> None:
        """Raise if the lease was lost: the run must not publish what another run now owns."""
        if self.lost:
            raise WeightsmithError(self.model.url, f"{self.lost}; run again when it has finished")

    def release(self) -> None:
        _HELD.discard(self.run_id)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            try:
                if self.model.store.exists(self.key) and self.model.store.read_bytes(self.key) == self._data:
                    self.model.store.delete(self.key)
            except Exception:  # noqa: BLE001 - it expires by itself; the run's own error matters more
                pass

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(model: ModelRef, run_id: str, wait_s: float = 0.0, ttl_s: float = TTL_S) -> Lease:
    """Take the model's lease for `run_id`, waiting up to `wait_s` for another holder to finish.

    Raises WeightsmithError naming the holder when it is still held after `wait_s`.
    """
    lease = Lease(model, run_id, ttl_s)
    deadline = time.monotonic() + wait_s
    while True:
        body = lease._body()
        if model.store.create_if_absent(lease.key, body):
            break
        old = _read(model, lease.key)
        if old is None:
            continue  # released between our two calls: try again at once
        holder = _parse(old)
        if _gone(holder) and model.store.replace_if_match(lease.key, body, old):
            break
        if time.monotonic() >= deadline:
            raise WeightsmithError(
                model.url,
                f"another run is writing this model ({describe(holder)}); "
                "wait for it to finish, or pass --wait SECONDS",
            )
        time.sleep(POLL_S)
    lease._data = body
    _HELD.add(run_id)
    lease._thread = threading.Thread(target=lease._beat, name=f"lease-{run_id}", daemon=True)
    lease._thread.start()
    return lease


def holder(model: ModelRef) -> dict | None:
    """Who holds the model's lease now (None when nobody does or the holder is gone)."""
    data = _read(model, model.key(LEASE))
    if data is None:
        return None
    info = _parse(data)
    return None if _gone(info) else info


def describe(info: dict) -> str:
    started = info.get("renewed")
    when = time.strftime("%H:%M:%S", time.localtime(started)) if isinstance(started, int | float) else "?"
    return f"run {info.get('run_id', '?')} on {info.get('host', '?')}, pid {info.get('pid', '?')}, alive at {when}"


def _read(model: ModelRef, key: str) -> bytes | None:
    try:
        return model.store.read_bytes(key)
    except FileNotFoundError:
        return None


def _parse(data: bytes) -> dict:
    try:
        info = json.loads(data)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _gone(info: dict) -> bool:
    """The holder stopped renewing, or it is a process of this host that no longer exists.

    A lease that cannot be read as ours (edited by hand, truncated) counts as gone.
    """
    expires = info.get("expires")
    if not isinstance(expires, int | float) or time.time() > expires:
        return True
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and pid == os.getpid():
        return info.get("run_id") not in _HELD
    if info.get("host") == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False
