"""The run's record formats read back: ``metrics.jsonl`` (one reader) and numbers for tables (one
formatter). Used by the resume's truncation, the run index, the experiments and the benchmarks;
``run_dir`` re-exports both."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List

from . import checkpoint as ckpt

__all__ = ["read_metrics", "parse_metrics", "format_number"]


INT64_MAX = 2 ** 63 - 1


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl, in order (see ``parse_metrics``). Only a regular file is
    read (never through a link, never waiting on a FIFO: ``OSError`` otherwise); a missing file
    holds none."""
    try:
        data = ckpt.read_regular(path)
    except FileNotFoundError:
        return []
    return parse_metrics(data, path)


def parse_metrics(data: bytes, name: Any) -> List[Dict[str, Any]]:
    """The records in the bytes of a metrics.jsonl: the one parser of the format (the trainer's
    resume, the run index, the experiments). Blank lines and lines that are not JSON (a line cut
    by a crash) are skipped; a line that is not UTF-8, or JSON that is not an object whose "step"
    (where it has one) is an integer from 0 to 2**63-1, raises ``ValueError`` naming ``name`` and
    the line."""
    records = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name} line {number} is not UTF-8 text") from None
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        step = rec.get("step", 0) if isinstance(rec, dict) else None
        if type(step) is not int or not 0 <= step <= INT64_MAX:
            raise ValueError(f"{name} line {number} is not a metrics record (an object with an integer step "
                             "from 0 to 2**63-1)")
        records.append(rec)
    return records


def format_number(x: Any, digits: int = 4, missing: str = "n/a", fixed: bool = False) -> str:
    """A number for a table: ``digits`` significant digits, or with ``fixed`` ``digits`` decimals
    (and whole numbers with thousands separators from 1000 on); ``missing`` for None, NaN, inf and
    anything that is not a number. The one formatter of the run index and the benchmark tables."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return missing
    if not math.isfinite(v):
        return missing
    if fixed:
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return f"{v:.{digits}g}"
