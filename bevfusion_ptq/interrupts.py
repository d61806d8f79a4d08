"""Stopping calibration between two batches when the run is interrupted.

A Ctrl-C or SIGTERM that lands in the middle of a batch would leave the calibrators with a
part of that batch (some layers saw it, others not): that state cannot be saved. While
calibration runs, the first SIGINT or SIGTERM is therefore only noted; the calibration loop
saves its state at the end of the current batch and then hands the signal on to whatever
handled it before (Python's KeyboardInterrupt, an orchestrator's termination handler). A
second signal is handed on at once, for a user who does not want to wait.

Signal handlers can only be set from the main thread; elsewhere this does nothing and
signals behave as usual.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class BatchBoundaryStop:
    """Signals noted during calibration; ``requested`` is the first one's number or None."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self.previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        if self.requested is not None:  # the second one: do not wait for the batch
            self.hand_on(signum)
            return
        self.requested = signum
        log.warning(
            "%s received: stopping after the current calibration batch, state saved "
            "(send it again to stop at once)", signal.Signals(signum).name,
        )

    def hand_on(self, signum: int | None = None) -> None:
        """Restore the previous handlers and deliver the (first) signal to them."""
        signum = signum or self.requested
        self.restore()
        if signum is not None:
            signal.raise_signal(signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


@contextmanager
def stop_between_batches() -> Iterator[BatchBoundaryStop]:
    """Defer SIGINT/SIGTERM to the caller's next check of ``requested`` (main thread only)."""
    stop = BatchBoundaryStop()
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            handler = signal.getsignal(signum)
            if handler in (signal.SIG_IGN, None):
                continue
            stop.previous[signum] = handler
            signal.signal(signum, stop._note)
    try:
        yield stop
    except BaseException:
        stop.restore()
        raise
    if stop.previous and stop.requested is not None:
        stop.hand_on()  # noted after the last batch's check: deliver it now
    stop.restore()
