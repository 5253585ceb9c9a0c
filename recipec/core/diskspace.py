"""Free-space guards: a build that cannot fit on disk stops before it writes, with the numbers, instead of
dying mid-write with ENOSPC (the staging area and cache temporaries would be cleaned, but the message would
be an internal error, after minutes of work)."""
from __future__ import annotations

import shutil
from pathlib import Path

from recipec.errors import PassError

HEADROOM_BYTES = 64 * 2**20  # logs, manifests, the onnx checker's temporaries


def tree_bytes(root: Path) -> int:
    root = Path(root)
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def require_free(directory: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(_existing(Path(directory))).free
    if free < need + HEADROOM_BYTES:
        raise PassError(f"not enough disk space for {what}: it needs about {_mib(need)} (+{_mib(HEADROOM_BYTES)} "
                        f"headroom) but {directory} has {_mib(free)} free; free some space or point the "
                        "cache/--out elsewhere")


def _existing(path: Path) -> Path:
    """disk_usage needs a path that exists; a cache or out/ not created yet lives on its nearest ancestor's disk."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
