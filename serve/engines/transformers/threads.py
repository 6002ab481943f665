"""The transformers engine's compute threads: OpenMP's wait policy, and as many threads as other processes leave CPUs.

On a machine another process keeps busy, an OpenMP team of one thread per core loses badly: every operation waits at
its barrier for the thread that shares a core with the other process, which the scheduler runs a slice at a time
(on two cores with one busy loop, a 32x576x1536 matmul took 9.5 ms on two spinning threads against 0.85 ms on one).
So the worker counts, every few seconds, the CPU time other processes took and computes on the cores they leave
free. With the load gone it goes back to every core, where a team of spinning threads is fastest (0.41 ms on two
threads against 0.55 ms when they sleep at once, OMP_WAIT_POLICY=PASSIVE): threads spin, but briefly.
"""

from __future__ import annotations

import os
import time

from adapterctl.core.threads import busy_seconds, cpus, free_cpus


class Threads:
    """Torch's intra-op threads on the calling thread, kept at the CPUs other processes leave free.

    `adjust` runs on the thread that computes (OpenMP's thread count is per thread), between forward passes; it
    checks at most once every PERIOD seconds. A fixed OMP_NUM_THREADS set by the user is left alone.
    """

    def __init__(self, period: float = 2.0) -> None:
        self.period = period
        self.allowed = cpus()
        self.fixed = "OMP_NUM_THREADS" in os.environ
        self.threads = 0  # set at the first `adjust`
        self.changes = 0  # how often the count changed after the first
        self._sample: tuple[float, float, float] | None = None

    def adjust(self) -> int:
        """Set the thread count from the last PERIOD's load, if that long has passed; returns it."""
        import torch

        if self.fixed:
            self.threads = torch.get_num_threads()
            return self.threads
        now = time.monotonic()
        if self._sample is not None and now - self._sample[0] < self.period:
            return self.threads
        sample = (now, busy_seconds(self.allowed), time.process_time())  # process time: every thread of ours
        threads = len(self.allowed)
        if self._sample is not None:
            seconds, busy, own = (new - old for new, old in zip(sample, self._sample, strict=True))
            threads = free_cpus(len(self.allowed), max(0.0, busy - own), seconds)
        self._sample = sample
        if threads != self.threads:
            self.changes += self.threads != 0
            torch.set_num_threads(threads)
            self.threads = threads
        return threads
