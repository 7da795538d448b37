"""How many CPU threads a training run should use on a machine it may share."""

from __future__ import annotations

import os


def training_threads(configured: int | str) -> int:
    """Threads for torch: a number, or 'auto' = the cores that other jobs are not using.

    Measured on the 2-core machine with another job running: one LoRA step over 2 x 880 tokens
    took 80 s with 2 threads and 25-32 s with 1, because each parallel region waits for a thread
    that shares its core with the other job. On an idle CPU 2 threads are ~1.9x faster than 1.
    """
    if configured != "auto":
        return int(configured)
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0]  # runnable processes, averaged over the last minute
    return max(1, cores - round(busy))
