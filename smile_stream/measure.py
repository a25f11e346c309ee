"""Memory measurement: peak anonymous RSS (heap, not mmap'd file pages), sampled on a thread."""

from __future__ import annotations

import threading
import time

import psutil


def rss_anon(pid: int | None = None) -> int:
    """Current anonymous resident memory in bytes (RssAnon from /proc/PID/status; psutil's rss minus shared as a fallback)."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    info = psutil.Process(pid).memory_info()
    return info.rss - getattr(info, "shared", 0)


class PeakMemory:
    """Samples RssAnon of a process every `interval` seconds until stopped; `.peak` is the maximum seen."""

    def __init__(self, pid: int | None = None, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.peak = self.current = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smile-memory", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.current = rss_anon(self.pid)
            except (OSError, psutil.Error):
                return  # the process is gone
            self.peak = max(self.peak, self.current)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def now() -> float:
    return time.perf_counter()
