"""``RUN/index.md``: one page that says what a run folder holds, for people and markdown viewers.

Written (atomically) at the end of a run, after ``--sample-only`` and ``--export``: the run's
status, a config summary, the latest value of every metric, the sample grids (the newest shown),
the data files, the checkpoints, exported weights in the folder, and the figures of an
experiment report above it (``EXP/report.md`` for runs in ``EXP/runs/LABEL/seedS``). Every link
is relative, so the folder can be moved or published as it is. Only regular files are read,
never through a link and never waiting on a FIFO, so a planted name copies nothing into it.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, List, Optional, Tuple

from . import checkpoint as ckpt
from .export import WEIGHTS_FORMAT

__all__ = ["INDEX_NAME", "SUMMARY_FIELDS", "write_run_index", "render_run_index", "latest_metrics"]

INDEX_NAME = "index.md"
SUMMARY_FIELDS = ("dataset", "formulation", "weighting", "noise_sampling", "arch", "channels", "channel_mults",
                  "steps", "batch_size", "lr", "ema_decay", "seed", "sampler", "sample_steps")
DATA_FILES = (("metrics.jsonl", "one JSON record per logged step"),
              ("binstats.npz", "per-bin mean and variance of the unweighted loss over training"),
              ("persample.npz", "per-sample log-SNR and the unweighted and weighted loss of the final EMA "
                                "and raw models"),
              ("samples.npz", "the --sample-only samples, uint8 NHWC under key \"images\""))
REPORT_LEVELS = 3  # EXP/runs/LABEL/seedS: the report is three folders up


def write_run_index(out: str) -> Optional[str]:
    """Write ``out/index.md``; returns its path, or None (with a warning) when it cannot be
    written: the index is a convenience and never fails a run."""
    from .run_dir import warn
    path = os.path.join(out, INDEX_NAME)
    try:
        ckpt.atomic_write_bytes(path, render_run_index(out).encode())
    except ckpt.WriteError as exc:  # what the atomic write raises: a finished run stays finished
        warn(f"warning: {exc}")
        return None
    except OSError as exc:
        warn(f"warning: could not write {path}: {exc.strerror or exc}")
        return None
    return path


def render_run_index(out: str) -> str:
    """The markdown of ``out``'s index."""
    lines = [f"# Run `{os.path.basename(os.path.abspath(out))}`", "", _status(out), ""]
    for section in (_config_section, _metrics_section, _samples_section, _files_section, _checkpoints_section,
                    _exports_section, _report_section):
        part = section(out)
        while part and not part[-1]:
            part.pop()
        if part:
            lines += part + [""]
    return "\n".join(lines).rstrip() + "\n"


def _link(target: str, out: str, text: Optional[str] = None) -> str:
    rel = os.path.relpath(target, out).replace(os.sep, "/")
    return f"[{text or rel}](<{rel}>)"


def _image(target: str, out: str, alt: str) -> str:
    rel = os.path.relpath(target, out).replace(os.sep, "/")
    return f"![{alt}](<{rel}>)"


def _fmt(value: Any) -> str:
    """A config or metric value: numbers by ``run_dir.format_number``, lists joined."""
    from .run_dir import format_number
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if value else "none"
    return str(value)


def _read_text(path: str) -> Optional[str]:
    """The text of ``path`` if it is a regular file: never read through a link (a planted one
    would copy its target into the index), never wait on a FIFO."""
    try:
        return ckpt.read_regular(path).decode("utf-8", errors="replace")
    except OSError:
        return None


def _read_json(path: str) -> Optional[Any]:
    text = _read_text(path)
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return None


def _status(out: str) -> str:
    done = _read_text(os.path.join(out, "DONE"))
    if done is not None:
        return f"Finished ({(done.splitlines() or [''])[0].strip()})."
    found = ckpt.list_checkpoints(os.path.join(out, "checkpoints"))
    if found:
        return f"Not finished; the latest checkpoint is at step {found[0][0]} (continue with `--resume`)."
    return "Not finished; no checkpoint yet."


def _config_section(out: str) -> List[str]:
    cfg = _read_json(os.path.join(out, "config.json"))
    if not isinstance(cfg, dict):
        return []
    rows = [f"| {k} | {_fmt(cfg[k])} |" for k in SUMMARY_FIELDS if k in cfg]
    return ["## Config", "", f"The full config: {_link(os.path.join(out, 'config.json'), out)}.", "",
            "| field | value |", "| --- | --- |"] + rows


def latest_metrics(path: str) -> Dict[str, Tuple[Any, int]]:
    """Every metric's latest value in a metrics.jsonl and its step (read by ``run_dir.read_metrics``:
    lines cut by a crash skipped, a line that is not a record a ``ValueError``)."""
    from .run_dir import read_metrics
    latest: Dict[str, Tuple[Any, int]] = {}
    try:
        records = read_metrics(path)
    except OSError:  # not a regular file (a link, a FIFO): never read through, the index shows no metrics
        records = []
    for rec in records:
        step = rec.get("step", 0)
        latest.update({k: (v, step) for k, v in rec.items() if k not in ("step", "final")})
    return latest


def _metrics_section(out: str) -> List[str]:
    try:
        latest = latest_metrics(os.path.join(out, "metrics.jsonl"))
    except (OSError, ValueError) as exc:  # the index never fails a run: it says what it could not read
        return ["## Latest metrics", "", f"Not readable: {exc}"]
    if not latest:
        return []
    rows = [f"| {k} | {_fmt(v)} | {step} |" for k, (v, step) in latest.items()]
    return ["## Latest metrics", "", "| metric | value | step |", "| --- | --- | --- |"] + rows


def _samples_section(out: str) -> List[str]:
    grids = sorted(glob.glob(os.path.join(glob.escape(out), "samples_step*.png")), reverse=True)
    final = os.path.join(out, "samples.png")
    lines = []
    if os.path.exists(final):
        lines += [f"`--sample-only` ({_link(final, out)}):", "", _image(final, out, "samples"), ""]
    if grids:
        lines += [f"The newest grid during training ({_link(grids[0], out)}):", "",
                  _image(grids[0], out, "samples"), ""]
        if len(grids) > 1:
            lines += ["Earlier grids: " + ", ".join(_link(g, out) for g in grids[1:]), ""]
    return ["## Samples", ""] + lines if lines else []


def _files_section(out: str) -> List[str]:
    rows = [f"- {_link(os.path.join(out, name), out)}: {what}" for name, what in DATA_FILES
            if os.path.exists(os.path.join(out, name))]
    return ["## Data", ""] + rows if rows else []


def _checkpoints_section(out: str) -> List[str]:
    found = ckpt.list_checkpoints(os.path.join(out, "checkpoints"))
    if not found:
        return []
    rows = [f"- {_link(path, out)} (step {step})" for step, path in found]
    return ["## Checkpoints", "", "For `--resume` and `--sample-only`; `--export PATH` writes weights others "
            "can open.", ""] + rows


def _exports_section(out: str) -> List[str]:
    rows = []
    for side in sorted(glob.glob(os.path.join(glob.escape(out), "*.json"))):
        meta = _read_json(side)
        weights = side[: -len(".json")]
        if isinstance(meta, dict) and meta.get("format") == WEIGHTS_FORMAT and os.path.exists(weights):
            rows.append(f"- {_link(weights, out)} ({meta.get('which', '?')} weights, step {meta.get('step', '?')}; "
                        f"config {_link(side, out, os.path.basename(side))}; `load_pretrained` opens it)")
    return ["## Exported weights", ""] + rows if rows else []


def _report_section(out: str) -> List[str]:
    folder = os.path.abspath(out)
    for _ in range(REPORT_LEVELS):
        folder = os.path.dirname(folder)
        report = os.path.join(folder, "report.md")
        if os.path.exists(report):
            figures = sorted(glob.glob(os.path.join(glob.escape(folder), "report", "*.png")))
            intro = f"This run is part of {_link(report, out, 'an experiment report')}; its figures:"
            return ["## Experiment report", "", intro, ""] + [_image(f, out, os.path.basename(f)) for f in figures]
    return []
