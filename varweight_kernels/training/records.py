"""The run's record formats read back: ``metrics.jsonl`` (one reader) and numbers for tables (one
formatter). Used by the resume's truncation, the run index, the experiments and the benchmarks;
``run_dir`` re-exports both."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List

from . import checkpoint as ckpt

__all__ = ["read_metrics", "format_number"]


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl, in order: the one reader of the format (the trainer's
    resume, the run index, the experiments). Only a regular file is read (never through a link,
    never waiting on a FIFO: ``OSError`` otherwise); a missing file holds none. Blank lines and
    lines that are not JSON (a line cut by a crash) are skipped; a line that is not UTF-8, or JSON
    that is not an object with an integer "step" (where it has one), raises ``ValueError`` naming
    the file and the line."""
    try:
        data = ckpt.read_regular(path)
    except FileNotFoundError:
        return []
    records = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} line {number} is not UTF-8 text") from None
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(rec, dict) and type(rec.get("step", 0)) is int):
            raise ValueError(f"{path} line {number} is not a metrics record (an object with an integer step)")
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
