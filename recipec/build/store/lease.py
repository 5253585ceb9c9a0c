"""A lease on building one key of a cache at a URL, so that two workers that start the same stage run it once.

<url>/leases/<key>.json holds {"owner", "host", "pid", "expires"}. A worker takes a free key by creating that
object create-only (S3's If-None-Match: *: of two creators exactly one succeeds), and an expired lease by
replacing it only if it is unchanged since it was read (If-Match: its ETag), so that two workers taking over
one dead lease cannot both win. While the stage runs, a heartbeat thread renews the lease (If-Match again) every
third of its term; a dead worker stops renewing, so its lease runs out within one term. A waiter polls, backing
off up to POLL_MAX_S, until the key's entry record appears (the holder published: reuse it), the lease
disappears (the holder gave up: take it) or runs out (take it over).

What this accepts. Expiry is judged by the waiter's clock against the time the holder wrote, so the nodes'
clocks must agree to well within a term (NTP keeps them within milliseconds). A holder stalled past its term
(a paused VM) can be taken over while it still works: both then build, and the create-only entry record keeps
the first one published. On a store without conditional writes (fsspec's generic create checks, then writes)
two workers can win one narrow race and both build. Duplicate work is the cost in every case, never a wrong
entry: each entry is complete and verified. Releasing reads the owner, then deletes; the lease deleted in
between could only be a successor's that took over this holder's lease after it ran out.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from recipec.build.store.remote import RemoteStore
from recipec.errors import RecipecError

POLL_FIRST_S, POLL_MAX_S = 0.1, 5.0
HELD, BUSY, RETRY = "held", "busy", "retry"


class Lease:
    def __init__(self, store: RemoteStore, key: str, seconds: float, warn: Callable[[str], None]):
        self.store, self.key, self.seconds, self.warn = store, key, seconds, warn
        self.path = store.lease_path(key)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.tag = ""
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._holder_expires = float("inf")

    def acquire(self, on_wait: Callable[[], None]) -> bool:
        """True once this worker holds the lease; False once the key's entry is published (nothing to build)."""
        delay, waited = POLL_FIRST_S, False
        while not self.store.has_record(self.key):
            state = self._try_take()
            if state == HELD:
                self._heartbeat = threading.Thread(target=self._beat, name=f"lease-{self.key[:12]}", daemon=True)
                self._heartbeat.start()
                return True
            if state == BUSY and not waited:
                on_wait()
                waited = True
            time.sleep(max(0.0, min(delay, self._holder_expires - time.time())) + 0.05)  # up when it runs out
            delay = min(2 * delay, POLL_MAX_S)
        return False

    def _try_take(self) -> str:
        self._holder_expires = float("inf")
        tag = self.store.create(self.path, self._body())
        if tag is not None:
            self.tag = tag
            return HELD
        current = self.store.read(self.path)
        if current is None:
            return RETRY  # released between our create and our read
        holder = parse(current[0])
        if holder is not None and holder["expires"] > time.time():
            self._holder_expires = holder["expires"]
            return BUSY
        tag = self.store.replace(self.path, self._body(), current[1])
        if tag is None:
            return RETRY  # renewed, released or taken over by another waiter since we read it
        self.tag = tag
        who = holder["owner"] if holder else "an unreadable lease"
        self.warn(f"cache key {self.key[:12]}: took over the build from {who}, whose lease ran out")
        return HELD

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.seconds}).encode()

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                tag = self.store.replace(self.path, self._body(), self.tag)
            except RecipecError as exc:  # the next beat may get through; the lease lasts a whole term
                self.warn(f"cache key {self.key[:12]}: could not renew the build lease: {exc}")
                continue
            if tag is None:
                self.warn(f"cache key {self.key[:12]}: another worker took over this build's lease (it ran out); "
                          "both build, and the entry published first is kept")
                return
            self.tag = tag

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this worker's. Never raises: it runs while a
        stage's own error may be on its way up, and an unreleased lease runs out by itself."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            current = self.store.read(self.path)
            if current is not None and (parse(current[0]) or {}).get("owner") == self.owner:
                self.store.delete(self.path)
        except RecipecError as exc:
            self.warn(f"cache key {self.key[:12]}: could not release the build lease ({exc}); "
                      f"it runs out within {self.seconds:g} s")


def parse(data: bytes) -> dict[str, Any] | None:
    try:
        lease = json.loads(data)
        valid = isinstance(lease, dict) and isinstance(lease.get("expires"), (int, float)) and "owner" in lease
        return lease if valid else None
    except ValueError:
        return None
