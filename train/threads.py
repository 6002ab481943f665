"""Training's compute threads: as many as the cores other processes leave free, re-checked between steps.

On two cores with one busy process beside it, a step on two threads waits at every OpenMP barrier for the thread
that shares its core (71 s against 5 s on a quiet machine); on one thread it runs at about half the quiet speed.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from transformers import TrainerCallback

from adapterctl.core.threads import busy_seconds, cpus, free_cpus


class ShareCpus(TrainerCallback):
    """Before a step, at most every PERIOD seconds: torch's threads = the cores others left free in the last period.

    A fixed OMP_NUM_THREADS (torchrun sets 1 per process) is left alone.
    """

    def __init__(self, period: float = 5.0) -> None:
        self.period = period
        self.allowed = cpus()
        self.fixed = "OMP_NUM_THREADS" in os.environ
        # The first window runs from here (before the eval pass and the Trainer's set-up) to the first step.
        self.last = self._sample()
        self.checked = False

    def _sample(self) -> tuple[float, float, float]:
        """Wall clock, the busy time of every allowed CPU, and this process's own CPU time (all its threads)."""
        return time.monotonic(), busy_seconds(self.allowed), time.process_time()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.fixed or (self.checked and time.monotonic() - self.last[0] < self.period):
            return
        sample = self._sample()
        wall, busy, ours = (new - old for new, old in zip(sample, self.last, strict=True))
        self.last, self.checked = sample, True
        threads = free_cpus(len(self.allowed), max(0.0, busy - ours), wall)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
