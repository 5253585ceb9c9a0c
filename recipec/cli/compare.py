"""`recipec compare A/report.json B/report.json`: two reports side by side with deltas."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipec.cli.common import EXIT_OK
from recipec.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("compare", help="two reports side by side with deltas")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args) -> int:
    from recipec.profile.compare import compare

    print(compare(_read_report(args.a), _read_report(args.b)))
    return EXIT_OK


def _read_report(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (not a report)") from None
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON: {exc}") from None
