"""Shared by the benchmark scripts: each prints one JSON line per figure, which run.py collects."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time


def machine() -> str:
    cores = os.cpu_count()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001
        gpu = "no GPU"
    return f"{platform.machine()} {cores} cores {mem_gib:.0f} GiB, {gpu}, load average {os.getloadavg()[0]:.1f} at the figure"


def peak_rss_mib() -> float:
    """Peak resident memory of this process and its finished children (MiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def emit(figure: str, value: float, unit: str, **extra) -> None:
    """One figure as a JSON line on stdout (run.py parses lines starting with 'BENCH ')."""
    row = {"figure": figure, "value": value, "unit": unit, "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
           "machine": machine(), "date": time.strftime("%Y-%m-%d"), **extra}
    print("BENCH " + json.dumps(row), flush=True)


class Timer:
    """Wall seconds (`seconds`) and this process's CPU seconds, all its threads (`cpu_seconds`), of the block."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start
