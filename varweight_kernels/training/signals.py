"""SIGINT/SIGTERM during training: finish the step, checkpoint, exit 0 (``--resume`` continues)."""
from __future__ import annotations

import signal
import threading
from typing import Any, Dict, Optional

__all__ = ["StopSignal", "SecondInterrupt"]


class SecondInterrupt(KeyboardInterrupt):
    """A SIGINT while a stop is already pending: abort without the checkpoint."""


class StopSignal:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, checkpoints and exits 0.
    A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise SecondInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
