"""A content-addressed store of stage outputs, keyed by the stage's cache key.

Layout: <root>/stages/<key>/output/ (what the stage wrote) and <root>/stages/<key>/entry.json
(the sha256 of every output file, the stage's metrics, time and peak memory). An entry appears only by an atomic
rename of a finished temporary directory, so a killed build leaves at most a stale temporary
directory (removed by the next run), never a half-written entry. Every read re-hashes the files:
a truncated or altered entry is reported, discarded and rebuilt. Two builds of one key at once are
serialized by a lock file, so the second finds the first one's entry instead of doing the work again.

The root may also be a URL (s3://bucket/prefix, gs://..., see recipec.build.store): the cache above then
lives in a local mirror of it (`root`), which stage outputs are written to first and entries are read
through. A commit is published to the URL (files first, the entry record last); a lookup that misses the
mirror downloads the entry, verifies it the same way and renames it into the mirror; a lock adds a lease at
the URL, so that one worker on any node builds a key while the others wait for its entry.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from recipec.build.store.lease import Lease
from recipec.build.store.location import resolve
from recipec.build.store.remote import RemoteStore
from recipec.core.diskspace import require_free
from recipec.core.hashing import file_digest, tree_digest  # noqa: F401 - tests reach them here too
from recipec.errors import UsageError

ENTRY = "entry.json"
LEASE_ENV = "RECIPEC_CACHE_LEASE_SECONDS"
# A dead worker blocks a key for at most this long; its holder renews it every third of it while it works.
LEASE_SECONDS = 60.0
REMOTE_ONLY = ("upload", "bytes")  # record fields that describe the remote copy, not the entry


def default_root() -> Path:
    """The local cache directory when no root is given (RECIPEC_CACHE, else ~/.cache/recipec); for a URL there,
    its mirror."""
    return resolve(None).local


@dataclass
class Entry:
    key: str
    output: Path
    meta: dict[str, Any]


class StageCache:
    def __init__(self, root: str | os.PathLike | None = None, warn: Callable[[str], None] = print):
        """`root`: a directory, or a URL; `self.root` is a local directory either way (for a URL, its mirror)."""
        where = resolve(root)
        self.url, self.root, self.warn = where.url, where.local, warn
        self.remote = RemoteStore(where.url) if where.url else None
        self.lease_seconds = lease_seconds()
        if self.remote is not None:
            self.remote.probe()
        for sub in ("stages", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    @property
    def location(self) -> str:
        """What another process or node passes to StageCache to reach this same cache."""
        return self.url or str(self.root)

    def entry_dir(self, key: str) -> Path:
        return self.root / "stages" / key

    def contains(self, key: str) -> bool:
        """Cheap presence check for `recipec plan` (no re-hashing): the mirror, then the URL's record."""
        if (self.entry_dir(key) / ENTRY).is_file():
            return True
        return self.remote is not None and self.remote.has_record(key)

    def lookup(self, key: str) -> Entry | None:
        entry = self._lookup_local(key)
        if entry is None and self.remote is not None:
            return self._download(key)
        return entry

    def _lookup_local(self, key: str) -> Entry | None:
        where = self.entry_dir(key)
        meta_file = where / ENTRY
        if not meta_file.is_file():
            return None
        meta, problem = self._verify(where, meta_file)
        if problem:
            self.warn(f"cache entry {key[:12]} is corrupt ({problem}); discarding it and rebuilding")
            shutil.rmtree(where, ignore_errors=True)
            return None
        return Entry(key, where / "output", meta)

    def _download(self, key: str) -> Entry | None:
        """The URL's entry, fetched into a temporary directory, verified, then renamed into the mirror."""
        assert self.remote is not None
        record, problem = self.remote.read_record(key)
        if record is None:
            if problem:
                self._discard_remote(key, None, problem)
            return None
        require_free(self.root, int(record.get("bytes") or 0), f"cache entry {key[:12]} from {self.url}")
        meta = {k: v for k, v in record.items() if k not in REMOTE_ONLY}
        work = self.new_workdir(key)
        try:
            problem = self.remote.download(key, record, work / "output") or self._write_meta(work, meta)
            if problem:
                self._discard_remote(key, record["upload"], problem)
                return None
            return self._place(key, work, meta)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # gone already when it was placed

    def _discard_remote(self, key: str, upload: str | None, problem: str) -> None:
        assert self.remote is not None
        self.warn(f"cache entry {key[:12]} at {self.url} is corrupt ({problem}); discarding it and rebuilding")
        self.remote.discard(key, upload)

    def _write_meta(self, work: Path, meta: dict[str, Any]) -> str | None:
        """The downloaded entry's entry.json; why its files do not match it, or None."""
        with open(work / ENTRY, "w") as handle:
            json.dump(meta, handle, indent=1, sort_keys=True)
        return self._verify(work, work / ENTRY)[1]

    def _verify(self, where: Path, meta_file: Path) -> tuple[dict[str, Any] | None, str | None]:
        """(the entry's metadata, None) when every file matches its recorded sha256, else (None, why not)."""
        try:
            meta = json.loads(meta_file.read_text())
            expected = meta["files"]
        except (ValueError, KeyError, OSError) as exc:
            return None, f"unreadable entry.json: {exc}"
        output = where / "output"
        actual = {str(p.relative_to(output)) for p in output.rglob("*") if p.is_file()} if output.is_dir() else set()
        if actual != set(expected):
            return None, f"files differ: missing {sorted(set(expected) - actual)[:3]}, unexpected {sorted(actual - set(expected))[:3]}"
        for rel, digest in expected.items():
            if file_digest(output / rel) != digest:
                return None, f"{rel} does not match its sha256"
        return meta, None

    @contextmanager
    def lock(self, key: str, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
        """This node's processes queue on a lock file; with a URL, the one at the front then takes the key's
        lease there, or waits for the worker holding it to publish (recipec.build.store.lease)."""
        once = _once(on_wait)
        with open(self.root / "locks" / f"{key}.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                once()  # another build is making this very stage: wait for it, then reuse its entry
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                with self._lease(key, once):
                    yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def _lease(self, key: str, on_wait: Callable[[], None]) -> Iterator[None]:
        if self.remote is None or (self.entry_dir(key) / ENTRY).is_file():
            yield  # nothing to build, or nothing to share it with
            return
        lease = Lease(self.remote, key, self.lease_seconds, self.warn)
        held = lease.acquire(on_wait)
        try:
            yield
        finally:
            if held:
                lease.release()

    def new_workdir(self, key: str) -> Path:
        """An empty directory for a stage to fill; named after this process so stale ones can be found."""
        work = self.root / "tmp" / f"{key[:16]}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        (work / "output").mkdir(parents=True)
        return work

    def commit(self, key: str, work: Path, metrics: dict[str, Any], seconds: float,
               extra: dict[str, Any] | None = None) -> Entry:
        """`extra`: more of the run that made the entry (its peak memory), kept beside its metrics and time."""
        output = work / "output"
        meta = {"key": key, "files": tree_digest(output), "metrics": metrics, "seconds": round(seconds, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
        with open(work / ENTRY, "w") as handle:
            json.dump(meta, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        entry = self._place(key, work, meta)
        if self.remote is not None:  # what the mirror holds is published: the first commit's, if two were made
            self.remote.publish(key, self.entry_dir(key), json.loads((self.entry_dir(key) / ENTRY).read_text()))
        return entry

    def _place(self, key: str, work: Path, meta: dict[str, Any]) -> Entry:
        """Rename a finished directory into place as the key's entry; the one already there wins."""
        target = self.entry_dir(key)
        try:
            os.rename(work, target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(work, ignore_errors=True)  # another build committed the same key first
        return Entry(key, target / "output", meta)

    def _remove_stale_temporaries(self) -> None:
        for work in (self.root / "tmp").iterdir():
            parts = work.name.split(".")
            if len(parts) == 3 and parts[1].isdigit() and not process_alive(int(parts[1])):
                shutil.rmtree(work, ignore_errors=True)


def lease_seconds() -> float:
    configured = os.environ.get(LEASE_ENV)
    try:
        seconds = float(configured) if configured else LEASE_SECONDS
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise UsageError(f"{LEASE_ENV}={configured!r}: give the build lease's term as a positive number of seconds")
    return seconds


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """`action` on the first call only: a wait on the lock file and one on the lease are one wait to a user."""
    done: list[bool] = []

    def call() -> None:
        if not done:
            done.append(True)
            action()
    return call


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
