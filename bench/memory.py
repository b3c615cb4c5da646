"""Peak memory of one configuration inside a long-lived process.

CPU: the kernel's peak-RSS counter (VmHWM) is reset by writing "5" to
/proc/self/clear_refs before the configuration and read from /proc/self/status
after it. Where that is not possible (no procfs, old kernel) a thread samples
VmRSS / ru_maxrss every few milliseconds instead. Before each configuration the
garbage collector runs and glibc returns free heap pages to the kernel
(``malloc_trim``), so one configuration's freed memory does not raise the next
one's floor.

CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``.

Both report the absolute peak and the peak above the level just before the
configuration started.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from dataclasses import dataclass

import torch


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class MemoryReading:
    peak_bytes: int
    before_bytes: int
    method: str

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.before_bytes)


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.reading``."""

    def __init__(self, device: torch.device | str = "cpu", sample_interval: float = 0.005):
        self.device = torch.device(device)
        self.sample_interval = sample_interval
        self.reading: MemoryReading | None = None
        self._method = ""
        self._before = 0
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            self._method = "torch.cuda.max_memory_allocated"
            return self
        rss = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            hwm = _status_kb("VmHWM")
            if rss is None or hwm is None or hwm > rss * 1.05 + 1024:
                raise OSError("VmHWM was not reset")
            self._before = rss * 1024
            self._method = "VmHWM after clear_refs"
        except OSError:
            self._before = (rss or 0) * 1024
            self._sampled = self._before
            self._method = "sampled VmRSS"
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _current_rss(self) -> int:
        rss = _status_kb("VmRSS")
        if rss is not None:
            return rss * 1024
        import resource  # ru_maxrss cannot be reset; last resort

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_interval):
            self._sampled = max(self._sampled, self._current_rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            peak = max(self._sampled, self._current_rss())
        else:
            peak = (_status_kb("VmHWM") or 0) * 1024
        self.reading = MemoryReading(peak_bytes=peak, before_bytes=self._before, method=self._method)
