"""Progress bars for people at a terminal; nothing extra for logs, CI and Prefect's run log.

The long loops (calibration, fidelity) already log a line every few batches, which is what a
log file wants. When stderr is a terminal, a tqdm bar shows the rate and ETA between those
lines as well. tqdm's ``disable=None`` is the switch: off whenever stderr is not a TTY.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def interactive() -> bool:
    return sys.stderr.isatty()


class Bar:
    """A bar updated with ``bar(seen, total)``, the progress-callback shape the stages use."""

    def __init__(self, total: int, desc: str, unit: str = "batch") -> None:
        self._bar = None
        if interactive():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=None)

    def __call__(self, seen: int, total: int) -> None:
        if self._bar is None:
            return
        self._bar.total = total
        self._bar.update(seen - self._bar.n)
        if seen >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def track(items: Iterable[T], total: int, desc: str, unit: str = "batch") -> Iterator[T]:
    """``items`` with a bar over the first ``total`` of them (on a terminal)."""
    bar = Bar(total, desc, unit)
    seen = 0
    try:
        for item in items:
            yield item
            seen += 1
            bar(min(seen, total), total)
    finally:
        bar.close()
