"""The Virtual Token Counter's rules, on a stub engine whose generations end when a test says."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from adapterctl.serve.engines.base import Chunk, GenerateRequest, Sampling
from adapterctl.serve.engines.fairness import OUTPUT_WEIGHT, PROMPT_WEIGHT, FairShare

PROMPT = 10  # tokens of every prompt here
FIRST = 3  # tokens a generation sends at once; one more when the test ends it


class Stub:
    """An engine that records the order generations reach it; each sends FIRST tokens (once its prompt is told to run,
    with HOLD), then one more when told."""

    def __init__(self, max_batched_tokens: int | None = None, hold: bool = False) -> None:
        self.max_batched_tokens = max_batched_tokens
        self.hold = hold
        self.started: list[str] = []
        self.priorities: dict[str, int] = {}
        self.tenants: dict[str, str | None] = {}
        self.prefilled: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.go: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.started.append(request.request_id)
        self.priorities[request.request_id] = request.priority
        self.tenants[request.request_id] = request.tenant
        if self.hold:
            await self.prefilled[request.request_id].wait()
        yield Chunk("abc", (1,) * FIRST)
        await self.go[request.request_id].wait()
        yield Chunk("d", (1,), "length")


class Bench:
    """A FairShare over a Stub, and one task per generation reading it to the end."""

    def __init__(self, capacity: int | None, max_batched_tokens: int | None = None, hold: bool = False) -> None:
        self.engine = Stub(max_batched_tokens, hold)
        self.fair = FairShare(self.engine, capacity)  # type: ignore[arg-type]
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def send(self, tenant: str, count: int, weight: float = 1.0) -> None:
        for _ in range(count):
            rid = f"{tenant}{sum(t.startswith(tenant) for t in self.tasks)}"
            request = GenerateRequest(rid, (1,) * PROMPT, None, Sampling(max_tokens=FIRST + 1))
            self.tasks[rid] = asyncio.ensure_future(self._read(tenant, weight, request))

    async def _read(self, tenant: str, weight: float, request: GenerateRequest) -> None:
        async for _ in self.fair.generate(tenant, weight, request):
            pass

    async def prefill(self, rid: str) -> None:
        """Let generation RID's prompt run (its first tokens come), and everything that follows from it happen."""
        self.engine.prefilled[rid].set()
        await settle()

    async def end(self, rid: str) -> None:
        """Let generation RID finish, and everything that follows from it happen."""
        self.engine.go[rid].set()
        await settle()

    async def end_each(self, count: int) -> list[str]:
        """End the oldest running generation COUNT times; the generations started meanwhile."""
        before = len(self.engine.started)
        for _ in range(count):
            running = [r for r in self.engine.started if not self.engine.go[r].is_set()]
            await self.end(running[0])
        return self.engine.started[before:]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def run(test: Callable[[], Awaitable[Any]]) -> None:
    asyncio.run(test())


def test_at_most_capacity_run_and_a_tenant_alone_uses_every_slot() -> None:
    async def test() -> None:
        bench = Bench(2)
        bench.send("a", 5)
        await settle()
        assert bench.engine.started == ["a0", "a1"] and bench.fair.waiting("a") == 3 and bench.fair.running == 2
        assert await bench.end_each(3) == ["a2", "a3", "a4"]
        assert bench.fair.running == 2 and bench.fair.waiting("a") == 0
        await bench.end_each(2)
        assert bench.fair.running == 0

    run(test)


def test_tokens_count_as_they_stream_prompt_tokens_when_admitted() -> None:
    async def test() -> None:
        bench = Bench(1)
        bench.send("a", 1, weight=2)
        await settle()
        assert bench.fair.counter("a") == (PROMPT * PROMPT_WEIGHT + FIRST * OUTPUT_WEIGHT) / 2
        await bench.end("a0")
        assert bench.fair.counter("a") == (PROMPT * PROMPT_WEIGHT + (FIRST + 1) * OUTPUT_WEIGHT) / 2

    run(test)


def test_a_newcomer_is_lifted_to_the_lowest_waiting_counter_and_goes_next() -> None:
    async def test() -> None:
        bench = Bench(2)
        bench.send("a", 10)
        await settle()
        assert bench.fair.counter("b") == 0
        bench.send("b", 1)
        await settle()
        # Idle time is not banked: b starts level with a, the only tenant waiting, not at 0.
        assert bench.fair.counter("b") == bench.fair.counter("a") == 2 * (PROMPT + FIRST * OUTPUT_WEIGHT)
        assert await bench.end_each(1) == ["b0"]  # the next free slot, not after a's backlog

    run(test)


def test_with_nobody_waiting_a_newcomer_is_lifted_to_the_last_tenant_that_waited() -> None:
    async def test() -> None:
        bench = Bench(1)
        bench.send("a", 2)
        await settle()
        await bench.end_each(2)  # a waited, then its queue emptied
        bench.send("b", 1)
        await settle()
        served = PROMPT * PROMPT_WEIGHT + FIRST * OUTPUT_WEIGHT  # b's own generation, admitted at once
        assert bench.fair.counter("b") - served == bench.fair.counter("a") > 0

    run(test)


def test_a_lifted_tenant_shares_with_the_backlogged_one_rather_than_taking_every_slot() -> None:
    async def test() -> None:
        bench = Bench(1)
        bench.send("a", 30)
        await settle()
        await bench.end_each(10)  # a alone: its counter grows
        bench.send("b", 10)
        await settle()
        order = await bench.end_each(10)
        assert 4 <= sum(r.startswith("b") for r in order) <= 6, order  # not all 10

    run(test)


def test_weights_split_admissions_in_their_ratio() -> None:
    async def test() -> None:
        bench = Bench(1)
        bench.send("a", 30, weight=2)
        bench.send("b", 30, weight=1)
        await settle()
        order = await bench.end_each(30)
        assert sum(r.startswith("a") for r in order) in (19, 20, 21), order

    run(test)


def test_a_waiting_generation_whose_reader_leaves_never_reaches_the_engine() -> None:
    async def test() -> None:
        bench = Bench(1)
        bench.send("a", 1)
        bench.send("b", 2)
        await settle()
        bench.tasks["b0"].cancel()
        await settle()
        assert bench.fair.waiting("b") == 1
        assert await bench.end_each(2) == ["b1"]
        assert "b0" not in bench.engine.started and bench.fair.running == 0

    run(test)


def test_a_generation_left_mid_way_frees_its_slot() -> None:
    async def test() -> None:
        bench = Bench(1)
        bench.send("a", 2)
        await settle()
        bench.tasks["a0"].cancel()
        await settle()
        assert bench.engine.started == ["a0", "a1"] and bench.fair.running == 1

    run(test)


def test_a_generation_admitted_as_its_reader_leaves_gives_its_slot_on() -> None:
    async def test() -> None:
        bench = Bench(1)
        bench.send("a", 1)
        bench.send("b", 2)
        await settle()
        bench.engine.go["a0"].set()
        while bench.fair.waiting("b") == 2:  # a0 ended: b0 is admitted, its task not yet run
            await asyncio.sleep(0)
        bench.tasks["b0"].cancel()
        await settle()
        assert bench.engine.started == ["a0", "b1"] and bench.fair.running == 1

    run(test)


def test_without_a_capacity_everything_goes_to_the_engine_at_once() -> None:
    async def test() -> None:
        bench = Bench(None)
        bench.send("a", 5)
        bench.send("b", 1)
        await settle()
        assert bench.engine.started == ["a0", "a1", "a2", "a3", "a4", "b0"] and bench.fair.running == 0
        await bench.end_each(6)

    run(test)


def test_prompts_not_yet_started_in_the_engine_hold_at_most_one_step_of_prefill() -> None:
    async def test() -> None:
        bench = Bench(capacity=8, max_batched_tokens=2 * PROMPT, hold=True)  # a window of two prompts
        bench.send("a", 6)
        await settle()
        assert bench.engine.started == ["a0", "a1"]  # rows are free, but two prompts fill the window
        bench.send("b", 1)  # its counter is lifted to a's: its first prompt goes in beyond the window at once
        await settle()
        assert bench.engine.started == ["a0", "a1", "b0"]  # not behind a's list, nor a's prompts in the engine
        await bench.prefill("a0")
        assert bench.engine.started == ["a0", "a1", "b0"]  # the window is full: a's next waits for room
        # In the engine, b's prompt goes before a's waiting one: each ranks by its tenant's prompts already there.
        assert [bench.engine.priorities[rid] for rid in ("a0", "a1", "b0")] == [0, 1, 0]
        assert [bench.engine.tenants[rid] for rid in ("a0", "a1", "b0")] == ["a", "a", "b"]  # the engine knows whose
        for rid in ("a1", "b0", "a2", "a3"):
            await bench.prefill(rid)
        assert bench.engine.started == ["a0", "a1", "b0", "a2", "a3", "a4", "a5"]
        for rid in bench.engine.started:
            bench.engine.prefilled[rid].set()
            await bench.end(rid)
        assert bench.fair.running == 0 and bench.fair.unstarted_tokens == 0

    run(test)


def test_a_prompt_longer_than_the_window_enters_alone() -> None:
    async def test() -> None:
        bench = Bench(capacity=8, max_batched_tokens=PROMPT // 2, hold=True)  # a window shorter than one prompt
        bench.send("a", 2)
        await settle()
        assert bench.engine.started == ["a0"]
        await bench.prefill("a0")
        assert bench.engine.started == ["a0", "a1"]

    run(test)
