"""The stage cache's copy at a URL, through fsspec (s3fs for s3://, whose endpoint comes from AWS_ENDPOINT_URL).

Layout under the URL:
  stages/<key>/entry.json            the record: the entry's metadata (the sha256 of every file, metrics, time,
                                     peak memory) plus the upload that holds its files. Written last and
                                     create-only, so an entry is visible whole or not at all, and of two
                                     publishers of one key the first wins.
  stages/<key>/<upload>/output/...   the files, under a name unique to the publishing process, so that a losing
                                     or interrupted publisher never overwrites the files a record points to.
  leases/<key>.json                  who is building the key, and until when (lease.py).

A missing object is an ordinary answer (None); every other failure to reach the URL becomes one
RemoteCacheError that names it, so the CLI prints a line instead of a library's traceback.
"""
from __future__ import annotations

import json
import os
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from recipec.errors import PassError, RecipecError, UsageError, one_line

RECORD = "entry.json"
S3_SCHEMES = ("s3", "s3a")
# The probe answers whether the URL works at all: one attempt and short timeouts, so that a wrong endpoint or
# bucket is reported in seconds instead of after botocore's and s3fs's retries with backoff.
PROBE_TIMEOUT_S = 3
ATTEMPTS = 4
PRECONDITION_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


class RemoteCacheError(PassError):
    """The stage cache's URL cannot be reached, read or written (exit 1)."""


class RemoteStore:
    def __init__(self, url: str):
        self.url = url
        self.protocol, _, self.base = url.partition("://")
        self._fs: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """A store crosses processes (a Ray task's arguments) as its URL; each process opens its own client."""
        return {**self.__dict__, "_fs": None}

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = self._connect(probe=False)
        return self._fs

    @property
    def s3(self) -> bool:
        return self.protocol in S3_SCHEMES

    def record_path(self, key: str) -> str:
        return f"{self.base}/stages/{key}/{RECORD}"

    def upload_dir(self, key: str, upload: str) -> str:
        return f"{self.base}/stages/{key}/{upload}"

    def lease_path(self, key: str) -> str:
        return f"{self.base}/leases/{key}.json"

    def probe(self) -> None:
        """Fail now, naming the URL, when its bucket is missing, denied or its endpoint unreachable."""
        fs = self._connect(probe=True)
        bucket = self.base.split("/", 1)[0]
        with self.guard("reach it"):
            try:
                if self.s3:
                    fs.call_s3("head_bucket", Bucket=bucket)
                elif not fs.exists(bucket):
                    raise FileNotFoundError(bucket)
            except FileNotFoundError:
                raise RemoteCacheError(f"stage cache {self.url}: the bucket {bucket!r} does not exist (create it, "
                                       f"or check the URL){self._endpoint_note()}") from None

    def _connect(self, probe: bool) -> Any:
        try:
            import fsspec
        except ImportError:
            raise UsageError(f"stage cache {self.url}: a cache at a URL needs fsspec: "
                             "pip install 'recipec[s3]'") from None
        options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if self.s3:
            options.update(s3_options(probe))
        with self.guard("open it"):
            fs = fsspec.filesystem(self.protocol, **options)
        if probe and self.s3:
            fs.retries = 1  # s3fs's own retry loop, around botocore's
        return fs

    @contextmanager
    def guard(self, doing: str) -> Iterator[None]:
        try:
            yield
        except RecipecError:
            raise
        except ImportError as exc:
            raise UsageError(f"stage cache {self.url}: {exc} (pip install 'recipec[s3]')") from None
        except Exception as exc:  # noqa: BLE001 - whatever the client library raises, the user gets the URL and why
            raise RemoteCacheError(f"stage cache {self.url}: cannot {doing}: {explain(exc)}"
                                   f"{self._endpoint_note()}") from None

    def _endpoint_note(self) -> str:
        endpoint = endpoint_url() if self.s3 else None
        return f" (endpoint {endpoint})" if endpoint else ""

    def has_record(self, key: str) -> bool:
        with self.guard(f"look up entry {key[:12]}"):
            try:
                self.fs.info(self.record_path(key))
            except FileNotFoundError:
                return False
        return True

    def read_record(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(the record, None); (None, None) when there is none; (None, why) when it cannot be used."""
        with self.guard(f"read entry {key[:12]}"):
            try:
                data = self.fs.cat_file(self.record_path(key))
            except FileNotFoundError:
                return None, None
        try:
            record = json.loads(data)
            problem = record_problem(record)
        except ValueError as exc:
            return None, f"unreadable {RECORD}: {exc}"
        return (None, problem) if problem else (record, None)

    def publish(self, key: str, entry_dir: Path, meta: dict[str, Any]) -> bool:
        """Upload a committed local entry: its files first, then its record. False when another worker's record
        was there first (this upload is then removed: the key's entry is theirs)."""
        if self.has_record(key):
            return False
        upload = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        output, rels = entry_dir / "output", sorted(meta["files"])
        remote = self.upload_dir(key, upload)
        with self.guard(f"publish entry {key[:12]}"):
            if rels:
                self.fs.put([str(output / rel) for rel in rels], [f"{remote}/output/{rel}" for rel in rels])
        record = {**meta, "upload": upload, "bytes": sum((output / rel).stat().st_size for rel in rels)}
        if self.create(self.record_path(key), json.dumps(record, indent=1, sort_keys=True).encode()) is not None:
            return True
        self.remove_tree(remote)
        return False

    def download(self, key: str, record: dict[str, Any], output: Path) -> str | None:
        """Fetch a record's files into `output`; why they cannot all be fetched, or None."""
        rels = sorted(record["files"])
        for rel in rels:
            (output / rel).parent.mkdir(parents=True, exist_ok=True)
        remote = self.upload_dir(key, record["upload"])
        with self.guard(f"download entry {key[:12]}"):
            try:
                if rels:
                    self.fs.get([f"{remote}/output/{rel}" for rel in rels], [str(output / rel) for rel in rels])
            except FileNotFoundError as exc:
                return f"a file is missing: {one_line(exc)}"
        return None

    def discard(self, key: str, upload: str | None) -> None:
        """Remove a corrupt entry, unless another worker has replaced it since it was read."""
        current, _ = self.read_record(key)
        if current is not None and current.get("upload") != upload:
            return
        self.delete(self.record_path(key))
        if upload:
            self.remove_tree(self.upload_dir(key, upload))

    def read(self, path: str) -> tuple[bytes, str] | None:
        """An object's bytes and its version tag (S3's ETag), or None when it does not exist."""
        with self.guard(f"read {path}"):
            try:  # tag before bytes: if the object changes in between, a swap against the older tag fails, as it should
                info = self.fs.info(path)
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                return None
        return data, version_tag(info)

    def create(self, path: str, data: bytes) -> str | None:
        """Write an object that must not exist yet: its version tag, or None when it already did. On S3 this is
        a PUT with If-None-Match: *, which the server applies atomically; elsewhere fsspec checks, then writes."""
        with self.guard(f"write {path}"):
            try:
                response = self.fs.pipe_file(path, data, mode="create")
            except OSError as exc:
                if precondition_failed(exc):
                    return None
                raise
        return self._written_tag(path, response)

    def replace(self, path: str, data: bytes, tag: str) -> str | None:
        """Overwrite an object only if it is still at version `tag` (S3: If-Match); its new tag, or None."""
        with self.guard(f"write {path}"):
            try:
                if self.s3:
                    response = self.fs.pipe_file(path, data, IfMatch=tag)
                else:  # fsspec's generic API has no compare-and-swap: check, then write (lease.py: why that will do)
                    current = self.read(path)
                    if current is None or current[1] != tag:
                        return None
                    response = self.fs.pipe_file(path, data)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError) or precondition_failed(exc):
                    return None
                raise
        return self._written_tag(path, response)

    def _written_tag(self, path: str, response: Any) -> str:
        if isinstance(response, dict) and response.get("ETag"):
            return response["ETag"]
        found = self.read(path)
        return found[1] if found else ""

    def delete(self, path: str) -> None:
        with self.guard(f"delete {path}"):
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass

    def remove_tree(self, path: str) -> None:
        with self.guard(f"delete {path}"):
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass


def s3_options(probe: bool) -> dict[str, Any]:
    config: dict[str, Any] = {"retries": {"max_attempts": 1 if probe else ATTEMPTS, "mode": "standard"}}
    if probe:
        config.update(connect_timeout=PROBE_TIMEOUT_S, read_timeout=PROBE_TIMEOUT_S)
    options: dict[str, Any] = {"config_kwargs": config}
    if endpoint_url():
        options["endpoint_url"] = endpoint_url()
    return options


def endpoint_url() -> str | None:
    """botocore's own variables: the S3-specific one first, as botocore reads them."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def record_problem(record: Any) -> str | None:
    """Why a record cannot be used, or None. Its file names become local paths: none may leave the entry."""
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return f"{RECORD} lacks its files"
    if not isinstance(record.get("upload"), str):
        return f"{RECORD} lacks its upload"
    for rel in record["files"]:
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            return f"{RECORD} names a file outside the entry: {rel!r}"
    if not record["upload"] or "/" in record["upload"] or record["upload"] in (".", ".."):
        return f"{RECORD} names an invalid upload {record['upload']!r}"
    return None


def version_tag(info: dict[str, Any]) -> str:
    """S3's ETag; elsewhere the modification time and size, which change with every write that matters here."""
    changed = info.get("mtime") or info.get("LastModified")
    return str(info.get("ETag") or info.get("etag") or f"{changed}:{info.get('size')}")


def precondition_failed(exc: OSError) -> bool:
    """s3fs turns a failed If-None-Match into FileExistsError only when the server names the condition; any
    412 (or S3's 409 for a concurrent conditional write) means the object was not as required."""
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    return str(response.get("Error", {}).get("Code")) in PRECONDITION_CODES


def explain(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return f"access denied ({one_line(exc)}): check the credentials and the bucket's policy"
    return one_line(exc)
