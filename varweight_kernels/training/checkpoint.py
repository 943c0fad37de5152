"""Fault-tolerant checkpoints: plain data only, atomic writes, versioned and checksummed.

File format (``checkpoints/ckpt_XXXXXXXX.pt``, XXXXXXXX = the step): a ``torch.save`` of the
wrapper dict

    {"format": "varweight-checkpoint", "format_version": 1,
     "sha256": <hex digest of payload>, "payload_bytes": <int>, "payload": <uint8 tensor>}

where ``payload`` holds the bytes of ``torch.save(state)`` and ``state`` is a tree of dicts
(string keys), lists, tuples, tensors, numbers, strings, bools and None only (configs as plain
dicts, every RNG state as a uint8 tensor). Both layers are read with
``torch.load(..., weights_only=True)``, so a file that needs any other pickled object is refused
and never executed; the checksum catches flipped bytes, the zip reader truncation.

Writes are atomic: the bytes go to a fresh hidden temp file in the same folder (never through a
planted link), which is flushed, fsync'ed, renamed over the final name, and the folder fsync'ed. A crash at any point leaves
the previous checkpoints intact (a stray temp file at worst, ignored and cleaned on resume).
A failed write (disk full, unwritable folder) raises ``CheckpointError`` and removes the temp
file. ``prune_checkpoints`` keeps the newest ``keep >= 2``, so a previous good one survives.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import secrets
import stat
import zipfile
import time
import warnings
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["CheckpointError", "FORMAT_NAME", "FORMAT_VERSION", "save_checkpoint", "load_checkpoint",
           "list_checkpoints", "checkpoint_path", "load_latest_good", "prune_checkpoints", "CheckpointUnreadable",
           "clean_temp_files", "check_plain", "atomic_write", "atomic_write_bytes", "WriteError", "write_reason",
           "SAVE_SLEEP_ENV", "CKPT_RE", "temp_target", "fsync_dir", "NotRegularFile", "file_kind", "open_regular",
           "read_regular", "has_header"]

FORMAT_NAME = "varweight-checkpoint"
FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^ckpt_(\d{8,})\.pt$")
CKPT_RE = _CKPT_RE  # a checkpoint's exact name
TEMP_PREFIX = ".tmp-"
_TEMP_RE = re.compile(r"^\.tmp-(.+)\.\d+\.[0-9a-f]{8}$")  # what atomic_write_bytes names its temp files
# Test hook: seconds to sleep half-way through writing a checkpoint's temp file (to kill -9 a
# process in the middle of a save). Never set in normal use.
SAVE_SLEEP_ENV = "VARWEIGHT_TEST_SAVE_SLEEP"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and says why."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint could not be read now (I/O error, too many open files, out of memory): says
    nothing about the file, so it is never quarantined and no older one is tried in its place."""


class WriteError(RuntimeError):
    """A file of the run could not be written (disk full, unwritable); its old content is intact."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"could not write {path}: {reason}; its previous content is intact")
        self.path, self.reason = path, reason


# -- writing -----------------------------------------------------------------------------------
_PLAIN = (int, float, bool, str, type(None))


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise ``TypeError`` unless ``obj`` is plain data (what ``weights_only`` loading accepts)."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: dict key {k!r} is a {type(k).__name__}, not str/int")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors, numbers, strings, "
                    "lists and dicts")


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms without directory fds
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (disk full or file-size limit)"
    return reason


def temp_target(name: str) -> Optional[str]:
    """The file name a temp file of ``atomic_write_bytes`` was to become, or None for another name."""
    m = _TEMP_RE.match(name)
    return m.group(1) if m else None


class NotRegularFile(OSError):
    """A path that should be a regular file is a link, a folder, a FIFO, a socket or a device."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(errno.EINVAL, f"it is {what}, not a regular file", path)
        self.what = what


def file_kind(mode: int) -> str:
    """"a folder", "a FIFO", ...: what a non-regular file of ``st_mode`` ``mode`` is."""
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a link")):
        if test(mode):
            return what
    return "a device"


def open_regular(path: str, follow_links: bool = False) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file, else raise ``NotRegularFile`` (an
    OSError). O_NONBLOCK: a FIFO never blocks the open; O_NOFOLLOW (unless ``follow_links``):
    nothing is read through a link."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links and os.path.islink(path):
            raise NotRegularFile(path, "a link") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(path, file_kind(mode))
    return open(fd, "rb")


def read_regular(path: str, follow_links: bool = False) -> bytes:
    """The bytes of ``path`` when it is a regular file (see ``open_regular``)."""
    with open_regular(path, follow_links) as fh:
        return fh.read()


def atomic_write_bytes(path: str, data, sleep_halfway: float = 0.0) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    view = memoryview(data)

    def write(fh) -> None:
        if sleep_halfway > 0:
            half = len(view) // 2
            fh.write(view[:half])
            fh.flush()
            time.sleep(sleep_halfway)
            fh.write(view[half:])
        else:
            fh.write(view)

    atomic_write(path, write)


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Let ``write`` fill ``path`` atomically: a fresh temp file in the same folder (created with
    O_EXCL | O_NOFOLLOW, so a planted link is never followed), fsync, rename over ``path`` (which
    replaces a link there rather than writing through it), fsync the folder. On failure the temp
    file is removed and ``WriteError`` names ``path``, which keeps its old content (or stays absent)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with open(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise WriteError(path, write_reason(exc)) from None
        raise
    fsync_dir(folder)


class _WrapperFile:
    """The file ``torch.save`` streams the wrapper into. It keeps a failed write's ``OSError``
    (``torch.save`` reports it as a ``RuntimeError``) and sleeps once, after half of ``total``
    bytes, for ``SAVE_SLEEP_ENV`` (the fault tests' window to kill a save half-way)."""

    def __init__(self, fh: BinaryIO, total: int, seconds: float) -> None:
        self.fh, self.left, self.seconds = fh, total // 2, seconds
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            n = self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.left -= len(memoryview(data))
        if self.seconds > 0 and self.left <= 0:
            self.fh.flush()
            time.sleep(self.seconds)
            self.seconds = 0.0
        return n

    def flush(self) -> None:
        self.fh.flush()


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Serialise ``state`` (plain data only) into the checksummed wrapper and write it atomically.
    One serialised copy is held in memory: the wrapper's payload is a view of it, and the
    wrapper streams into the file."""
    check_plain(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    raw = buf.getbuffer()
    digest = hashlib.sha256(raw).hexdigest()
    payload = torch.frombuffer(raw, dtype=torch.uint8) if len(raw) else torch.empty(0, dtype=torch.uint8)
    wrapper = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "sha256": digest,
               "payload_bytes": int(payload.numel()), "payload": payload}
    sleep = float(os.environ.get(SAVE_SLEEP_ENV, "0") or 0)

    def write(fh: BinaryIO) -> None:
        sink = _WrapperFile(fh, len(raw), sleep)
        try:
            torch.save(wrapper, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise

    try:
        atomic_write(path, write)
    except WriteError as exc:
        raise CheckpointError(f"could not write checkpoint {path}: {exc.reason}; "
                              "the previous checkpoints are intact") from None


# -- reading -----------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _safe_load(source, name: str, what: str):
    """``torch.load(weights_only=True)``; what it cannot parse is ``CheckpointError`` (corrupt), while
    a failure to read (``OSError``, ``MemoryError``) passes through: it is not the file's fault."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except pickle.UnpicklingError as exc:
        # a pickled object (a GLOBAL the weights-only unpickler refuses) is an attack or another
        # tool's file; any other unpickling error (an unknown opcode: random bytes) is damage
        m = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(exc))
        if m is not None:
            raise CheckpointError(f"checkpoint {name} refused: its {what} needs pickled Python objects "
                                  f"({m.group(1)}), which are never loaded (weights_only=True); it was not "
                                  "executed") from None
        raise CheckpointError(f"checkpoint {name} is corrupted ({what} unreadable: {_first_line(exc)})") from None
    except Exception as exc:  # zip/stream errors from truncation or garbage
        raise CheckpointError(f"checkpoint {name} is truncated or corrupted ({what} unreadable: "
                              f"{type(exc).__name__}: {_first_line(exc)})") from None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read, verify and return a checkpoint's state (tensors on CPU). Raises ``CheckpointError``
    naming ``path`` if the file is truncated, corrupted, of another format version, or needs
    pickled objects; ``CheckpointUnreadable`` if it cannot be read now (missing, I/O error, out of memory)."""
    try:
        return _load_checkpoint(str(path))
    except NotRegularFile as exc:  # a folder or FIFO of that name: no checkpoint, never waited on
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror}") from None
    except OSError as exc:
        raise CheckpointUnreadable(f"checkpoint {path} cannot be read: {exc.strerror or exc}; it was left as it "
                                   "is (retry when the cause is gone)") from None
    except MemoryError:
        raise CheckpointUnreadable(f"checkpoint {path} cannot be read: out of memory; it was left as it is") from None


def _load_checkpoint(name: str) -> Dict[str, Any]:
    with open_regular(name, follow_links=True) as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise CheckpointError(f"checkpoint {name} is empty (truncated)")
        wrapper = _safe_load(fh, name, "file")
    if not isinstance(wrapper, dict) or wrapper.get("format") != FORMAT_NAME:
        raise CheckpointError(f"checkpoint {name} is not a varweight checkpoint (no '{FORMAT_NAME}' header)")
    version = wrapper.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {name} has format version {version!r}; this build reads "
                              f"version {FORMAT_VERSION}")
    payload = wrapper.get("payload")
    if (not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1
            or payload.numel() != wrapper.get("payload_bytes")):
        raise CheckpointError(f"checkpoint {name} is corrupted (payload missing or of the wrong size)")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != wrapper.get("sha256"):
        raise CheckpointError(f"checkpoint {name} is corrupted (sha256 checksum mismatch)")
    state = _safe_load(io.BytesIO(data), name, "payload")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {name} is corrupted (payload is not a dict)")
    return state


# -- the checkpoint folder ---------------------------------------------------------------------
def checkpoint_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"ckpt_{int(step):08d}.pt")


def list_checkpoints(folder: str) -> List[Tuple[int, str]]:
    """``[(step, path), ...]`` of the finished checkpoint files, newest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = []
    for n in names:
        m = _CKPT_RE.match(n)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, n)))
    return sorted(found, reverse=True)


def clean_temp_files(folder: str) -> None:
    """Remove temp files left by a save that was killed."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for n in names:
        if temp_target(n) is not None:
            try:
                os.unlink(os.path.join(folder, n))
            except OSError:
                pass


def has_header(path: str) -> bool:
    """Whether ``path`` looks like a varweight checkpoint: a torch zip archive whose pickle names
    the format (read without loading the payload; for telling a run of an older version, which
    has no run marker, from someone else's folder)."""
    try:
        with open_regular(path) as fh, zipfile.ZipFile(fh) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            return bool(pickles) and FORMAT_NAME.encode() in archive.read(pickles[0])[:4096]
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        return False


def load_latest_good(folder: str, warn: Callable[[str], None] = print,
                     quarantine: bool = True) -> Tuple[str, Dict[str, Any]]:
    """The newest checkpoint in ``folder`` that loads and verifies: ``(path, state)``.

    A bad one is reported through ``warn`` (naming the file and why) and, with ``quarantine``,
    renamed to ``<name>.corrupt`` so that it is never retried or counted as a kept checkpoint;
    the previous one is tried next. Raises ``CheckpointError`` when none is good, and
    ``CheckpointUnreadable`` at once, quarantining nothing, when one cannot be read now."""
    ckpts = list_checkpoints(folder)
    if not ckpts:
        raise CheckpointError(f"no checkpoint to resume from in {folder}")
    problems = []
    for _, path in ckpts:
        try:
            return path, load_checkpoint(path)
        except CheckpointUnreadable:
            raise
        except CheckpointError as exc:
            problems.append(str(exc))
            tail = "; trying the previous one" if path != ckpts[-1][1] else ""
            warn(f"warning: {exc}{tail}")
            if quarantine and "format version" not in str(exc):
                try:
                    os.replace(path, path + ".corrupt")
                except OSError:
                    pass
    raise CheckpointError(f"no good checkpoint in {folder}: " + "; ".join(problems))


def prune_checkpoints(folder: str, keep: int) -> None:
    """Delete all but the newest ``keep`` (>= 2) checkpoints."""
    keep = max(2, int(keep))
    for _, path in list_checkpoints(folder)[keep:]:
        try:
            os.unlink(path)
        except OSError:
            pass
