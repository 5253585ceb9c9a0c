"""A content-addressed store of stage outputs, keyed by the stage's cache key.

Layout: <root>/stages/<key>/output/ (what the stage wrote) and <root>/stages/<key>/entry.json
(the sha256 of every output file, the stage's metrics, time and peak memory). An entry appears only by an atomic
rename of a finished temporary directory, so a killed build leaves at most a stale temporary
directory (removed by the next run), never a half-written entry. Every read re-hashes the files:
a truncated or altered entry is reported, discarded and rebuilt. Two builds of one key at once are
serialized by a lock file, so the second finds the first one's entry instead of doing the work again.
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

from recipec.core.hashing import file_digest, tree_digest  # noqa: F401 - tests reach them here too

ENTRY = "entry.json"


def default_root() -> Path:
    configured = os.environ.get("RECIPEC_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "recipec"


@dataclass
class Entry:
    key: str
    output: Path
    meta: dict[str, Any]


class StageCache:
    def __init__(self, root: Path | None = None, warn: Callable[[str], None] = print):
        self.root = Path(root) if root else default_root()
        self.warn = warn
        for sub in ("stages", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    def entry_dir(self, key: str) -> Path:
        return self.root / "stages" / key

    def contains(self, key: str) -> bool:
        """Cheap presence check for `recipec plan` (no re-hashing)."""
        return (self.entry_dir(key) / ENTRY).is_file()

    def lookup(self, key: str) -> Entry | None:
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
        with open(self.root / "locks" / f"{key}.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait()  # another build is making this very stage: wait for it, then reuse its entry
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
