"""The transformers engine's compute threads: OpenMP's spin setting in the server process, and a thread count that
follows the CPUs other processes leave free."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving import server_process

from adapterctl.registry.repo import Registry
from adapterctl.serve.engines.transformers import threads
from adapterctl.serve.engines.transformers.threads import Threads, free_cpus


def test_a_core_counts_as_taken_when_other_processes_keep_it_busy_more_than_half_the_time():
    assert free_cpus(2, others_busy=0.2, seconds=1.0) == 2
    assert free_cpus(2, others_busy=1.0, seconds=1.0) == 1  # one competing busy loop on two cores
    assert free_cpus(2, others_busy=6.0, seconds=2.0) == 1  # always one for us
    assert free_cpus(8, others_busy=4.8, seconds=2.0) == 6
    assert free_cpus(4, others_busy=0.0, seconds=0.0) == 4


def test_the_thread_count_drops_while_another_process_takes_a_core_and_comes_back_after(monkeypatch):
    # The machine's load cannot be set from a test (other processes come and go), so /proc/stat's busy time is
    # replaced by one that says what another process took: the adjustment from it to torch's threads is real.
    clock, others = [0.0], [0.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(threads.time, "process_time", lambda: 0.0)
    monkeypatch.setattr(threads, "busy_seconds", lambda allowed: others[0])
    monkeypatch.setattr(threads, "cpus", lambda: [0, 1])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen: list[tuple[int, int]] = []

    def worker() -> None:  # torch's thread count belongs to the thread that computes
        import torch

        threads = Threads(period=2.0)
        for step in range(8):
            clock[0] = step * 1.0
            if 2 <= step < 5:  # another process keeps one core busy from here...
                others[0] += 1.0
            threads.adjust()
            seen.append((threads.threads, torch.get_num_threads()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    # Checked every 2 s: both cores at first, one at 4 s (the load of 2-4 s), both again at 6 s (4-6 s: half a core).
    assert seen == [(2, 2), (2, 2), (2, 2), (2, 2), (1, 1), (1, 1), (2, 2), (2, 2)]


# `adapters serve`, whose engine prints the thread count its worker computes on; torch is imported only after the
# command configured OpenMP, as in the server itself.
_THREADS = """
import sys
from adapterctl.core import threads
configure = threads.configure_openmp
def configured():
    configure()
    import torch
    from adapterctl.serve.engines.transformers.engine import TransformersEngine
    step = TransformersEngine._step
    def told(self, *args):
        print(f"threads: {torch.get_num_threads()} of {self.threads.threads}", flush=True)
        step(self, *args)
    TransformersEngine._step = told
threads.configure_openmp = configured
from adapterctl.cli import main
main(sys.argv[1:])
"""


def test_the_server_process_starts_openmp_with_a_short_spin_and_its_worker_sets_the_threads(
    registry: Registry, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_DISPLAY_ENV", "VERBOSE")  # libgomp prints its settings as it starts
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = ["serve", "--base", str(tiny_base), "--quantize", "none", "--port", "0"]
    with server_process(["-c", _THREADS, *args], registry.root) as (_, url, lines):
        body: dict[str, Any] = {"model": tiny_base.name, "prompt": "Hello", "max_tokens": 2}
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        assert httpx.post(f"{url}/v1/completions", json={**body, "model": model}, timeout=60).status_code == 200
    log = "".join(lines)
    assert "GOMP_SPINCOUNT = '10000'" in log, log
    told = [line.split() for line in lines if line.startswith("threads: ")]
    assert told and all(words[1] == words[3] for words in told)  # the worker computes on the count it chose
