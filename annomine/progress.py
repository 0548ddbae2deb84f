"""Progress of long work: a bar on a terminal, a periodic line with a rate in a log file.

`progress(total, desc, unit)` returns a tqdm bar when stderr is a terminal (and tqdm is not disabled)
and otherwise a `PeriodicLine`, which logs one INFO line every `interval_s` seconds:

    train tier1: 120/519 step (23%), 2.1 step/s, about 3 min left (epoch=1, loss=0.981)

Both take `update(n)`, `set_postfix(**values)` and `close()` and work as context managers, so a loop
shows progress the same way wherever its output goes.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("annomine.progress")

INTERVAL_S = float(os.environ.get("ANNOMINE_PROGRESS_INTERVAL_S", "30"))


class PeriodicLine:
    """Counts work done and logs a line with the rate and the time left at most every `interval_s` seconds."""

    def __init__(self, total: int, desc: str, unit: str, interval_s: float = INTERVAL_S,
                 logger: logging.Logger = log, clock=time.monotonic, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.interval_s, self.logger, self.clock = interval_s, logger, clock
        self.initial = self.done = initial
        self.postfix: dict = {}
        self.started = self.last = clock()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval_s:
            self.last = now
            self.logger.info(self.line(now))

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.initial) / elapsed
        text = f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {rate:,.1f} {self.unit}/s"
        if rate > 0 and self.total > self.done:
            text += f", about {_duration((self.total - self.done) / rate)} left"
        if self.postfix:
            text += " (" + ", ".join(f"{k}={v}" for k, v in self.postfix.items()) + ")"
        return text

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _bars_wanted() -> bool:
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "") in ("", "0", "false", "False")


def progress(total: int, desc: str, unit: str = "it", mininterval: float = 5.0, initial: int = 0):
    """A tqdm bar on a terminal, else a `PeriodicLine` logging to the log; `initial`: work done before."""
    if _bars_wanted():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, mininterval=mininterval, initial=initial)
    return PeriodicLine(total, desc, unit, initial=initial)


def progress_iter(items, desc: str, unit: str = "it", total: int | None = None, initial: int = 0):
    """Iterate `items`, showing progress one item at a time (`total` and `initial` count the whole work)."""
    total = len(items) if total is None else total
    with progress(total, desc, unit, initial=initial) as bar:
        for item in items:
            yield item
            bar.update(1)
