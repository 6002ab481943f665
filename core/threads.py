"""Compute threads of a process that shares its machine: OpenMP's wait, and the CPUs other processes leave free.

On a machine another process keeps busy, an OpenMP team of one thread per core loses badly: every operation waits at
its barrier for the thread that shares a core with the other process, which the scheduler runs a slice at a time.
Serving and training both count the CPU time other processes took and compute on the cores they leave free.
"""

from __future__ import annotations

import os

SPIN_COUNT = "10000"  # busy-wait iterations before a waiting OpenMP thread sleeps: tens of microseconds


def configure_openmp() -> None:
    """Before torch loads: OpenMP threads spin briefly (GOMP_SPINCOUNT) before they sleep, unless the user chose.

    libgomp spins 300,000 iterations by default, which takes a shared core from the server's event loop and from
    other processes; it reads the setting when it initialises, that is when torch is imported.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def cpus() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0))


def busy_seconds(allowed: list[int]) -> float:
    """CPU seconds the ALLOWED CPUs have spent busy since boot, every process together (from /proc/stat)."""
    busy = 0
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in allowed:
                continue
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy / os.sysconf("SC_CLK_TCK")


def free_cpus(allowed: int, others_busy: float, seconds: float) -> int:
    """Cores to compute on when other processes took OTHERS_BUSY CPU seconds in SECONDS on ALLOWED cores.

    A core counts as taken when others kept it busy more than half the time; one is always ours.
    """
    taken = others_busy / seconds if seconds > 0 else 0.0
    return max(1, min(allowed, int(allowed - taken + 0.5)))
