"""Long work shows progress in a log file too: a periodic line with the rate and the time left."""

from __future__ import annotations

import logging

from annomine.progress import PeriodicLine, progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_periodic_line_is_logged_once_an_interval_with_the_rate_and_time_left(caplog):
    clock = Clock()
    line = PeriodicLine(total=100, desc="train tier1", unit="step", interval_s=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="annomine.progress"):
        for _ in range(10):  # 10 steps in 20 s: under the interval, nothing yet
            clock.now += 2
            line.update(1)
        assert caplog.messages == []
        line.set_postfix(epoch=1, loss="0.981")
        for _ in range(10):  # 20 steps in 40 s: one line at 30 s
            clock.now += 2
            line.update(1)
    assert caplog.messages == ["train tier1: 15/100 step (15%), 0.5 step/s, about 3 min left (epoch=1, loss=0.981)"]


def test_the_rate_counts_only_work_done_here_when_resuming():
    clock = Clock()
    line = PeriodicLine(total=1000, desc="encode", unit="item", interval_s=30, clock=clock, initial=600)
    clock.now = 100
    line.update(200)
    assert line.line(clock.now) == "encode: 800/1,000 item (80%), 2.0 item/s, about 2 min left"


def test_without_a_terminal_progress_is_the_periodic_line(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert isinstance(progress(10, "x"), PeriodicLine)
