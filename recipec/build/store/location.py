"""Where a stage cache lives: a local directory as before, or a URL (s3://, gs://, ...) read through a local
mirror on each node.

A URL can arrive through argparse's `type=Path`, which folds `s3://bucket` into `s3:/bucket`: a scheme that
fsspec knows is unfolded rather than taken as a relative directory named "s3:". file:// stays a local path, so
a shared file system keeps the local cache's flock and atomic renames.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from recipec.errors import UsageError

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$")
LOCAL_SCHEMES = ("file", "local")
MIRROR_ENV = "RECIPEC_CACHE_LOCAL"


@dataclass(frozen=True)
class Location:
    url: str | None  # None: a local cache
    local: Path  # the cache itself, or the URL's mirror


def user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recipec"


def resolve(root: str | os.PathLike | None) -> Location:
    text = str(root) if root else os.environ.get("RECIPEC_CACHE", "")
    if not text:
        return Location(None, user_cache())
    match = SCHEME.match(text)
    if match is None or len(match.group(1)) < 2:  # one letter: a Windows drive, never a scheme
        return Location(None, Path(text).expanduser())
    scheme, rest = match.group(1).lower(), match.group(2).rstrip("/")
    if scheme in LOCAL_SCHEMES:
        return Location(None, Path(urlparse(text).path))
    if scheme not in known_schemes():
        if "://" in text:
            raise UsageError(f"stage cache {text}: no filesystem handles {scheme}:// (s3://, gs://, file:// or a path)")
        return Location(None, Path(text).expanduser())
    url = f"{scheme}://{rest}"
    return Location(url, mirror_dir(url))


def mirror_dir(url: str) -> Path:
    """One mirror per URL, so that two caches on one node never mix entries of different buckets."""
    configured = os.environ.get(MIRROR_ENV)
    if configured:
        return Path(configured).expanduser()
    return user_cache() / "mirrors" / hashlib.sha256(url.encode()).hexdigest()[:16]


def known_schemes() -> set[str]:
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:  # fsspec comes with torch; without it no URL can be served, so none is recognised
        return set()
    return set(known_implementations) | set(registry)
