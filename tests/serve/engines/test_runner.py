"""The transformers engine's batch runner: one pass a step, running rows' next tokens and parts of prompts within a
token budget, long prompts in chunks; the row cache's memory following the rows it holds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from engines import Reader, chunks, request

from adapterctl.serve.engines.base import Chunk, GenerateRequest, InvalidRequest, Sampling
from adapterctl.serve.engines.transformers.engine import TransformersEngine, block_bytes

LONG = Sampling(max_tokens=6, temperature=0, ignore_eos=True)
RUNNING = Sampling(max_tokens=60, temperature=0, ignore_eos=True)
SCORED = Sampling(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def chunked(tiny_base: Path) -> Iterator[TransformersEngine]:
    built = TransformersEngine(
        tiny_base, model_id="tiny", quantize="none", max_batch=4, prefill_chunk=64, max_batched_tokens=256
    )
    yield built
    asyncio.run(built.close())


def long_prompt(engine: TransformersEngine) -> list[int]:
    """About 900 tokens: fifteen chunks of 64."""
    ids = engine.encode(" ".join(f"line {i} of a long document about foxes." for i in range(100)))
    return ids[:900]


@dataclass(frozen=True)
class Pass:
    """One pass the runner made: the request ids of its running rows, its prompt parts (id, tokens), cache bytes."""

    running: frozenset[str]
    parts: tuple[tuple[str, int], ...]
    nbytes: int

    @property
    def tokens(self) -> int:
        return len(self.running) + sum(take for _, take in self.parts)


def record_passes(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> list[Pass]:
    """Each pass the runner makes from now on."""
    runner, passes = engine._runner, []
    run = runner._pass

    def recorded(decoding, parts):
        ids = frozenset(row.generation.request.request_id for row in decoding)
        taken = tuple((row.generation.request.request_id, take) for row, take in parts)
        passes.append(Pass(ids, taken, runner.cache.nbytes()))
        return run(decoding, parts)

    monkeypatch.setattr(runner, "_pass", recorded)
    return passes


def run_alongside(engine: TransformersEngine, prompt: list[int]) -> tuple[list[int], list[int]]:
    """A short generation starts; once it streams, the long PROMPT arrives. Both texts' token ids."""

    async def run() -> tuple[list[int], list[int]]:
        running = Reader(engine, request(engine, "Hello there", sampling=RUNNING))
        await running.started.wait()
        long = Reader(engine, request(engine, prompt, sampling=LONG))
        await asyncio.gather(running.task, long.task)
        ids = [[t for chunk in reader.chunks for t in chunk.token_ids] for reader in (running, long)]
        return ids[0], ids[1]

    return asyncio.run(run())


def test_a_long_prompt_is_prefilled_in_chunks_beside_the_running_rows_and_gives_the_same_tokens(
    chunked, tiny_base, monkeypatch
):
    prompt = long_prompt(chunked)
    whole = TransformersEngine(tiny_base, model_id="tiny", quantize="none", max_batch=4, prefill_chunk=0)
    try:
        expected_running, expected_long = run_alongside(whole, prompt)
    finally:
        asyncio.run(whole.close())
    monkeypatch.setattr(chunked._runner, "max_batched_tokens", 64)
    passes = record_passes(chunked, monkeypatch)
    assert run_alongside(chunked, prompt) == (expected_running, expected_long)  # greedy: token for token
    taken = Counter()
    for p in passes:
        taken.update(dict(p.parts))
    (long_id, total), _ = taken.most_common(2)
    assert total == 900
    long_parts = [p for p in passes if long_id in dict(p.parts)]
    assert len(long_parts) == 15  # 900 tokens, 63 a pass beside the running row's token
    # Every pass of the long prompt also gave the running row its next token, within the budget of 64.
    assert all(len(p.running) == 1 and p.tokens <= 64 for p in long_parts)


def test_the_cache_gives_back_a_long_requests_memory_when_it_ends(chunked, monkeypatch):
    passes = record_passes(chunked, monkeypatch)
    run_alongside(chunked, long_prompt(chunked))
    widest = max(i for i, p in enumerate(passes) if len(p.running) == 2)
    peak = max(p.nbytes for p in passes)
    after = [p.nbytes for p in passes[widest + 1 :] if p.running]
    assert after and peak >= 8 * max(after)  # 2 rows x 1024 tokens while it ran; 1 row of 128 after
    deadline = time.monotonic() + 60  # the worker drops the last row just after sending its last token
    while chunked._runner.cache.nbytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chunked._runner.cache.nbytes() == 0  # no rows, no storage


def test_short_prompts_prefilled_while_a_long_one_is_filled_leave_every_row_its_tokens(chunked, tiny_base, monkeypatch):
    prompts = [long_prompt(chunked)[:300], "Hello there", "Once upon a time"]  # the long one: 256 tokens, then 44
    whole = TransformersEngine(tiny_base, model_id="tiny", quantize="none", max_batch=4, prefill_chunk=0)
    try:
        alone = [asyncio.run(chunks(whole, request(whole, p, sampling=SCORED))) for p in prompts]
    finally:
        asyncio.run(whole.close())
    runner, filled, seen = chunked._runner, threading.Event(), []
    original, forward = runner._pass, runner.forward

    def pass_then_wait(decoding, parts):  # the fault point: after the first part, hold until both short prompts wait
        seen.append(len(decoding) + len(parts))
        done = original(decoding, parts)
        if not filled.is_set():
            filled.set()
            deadline = time.monotonic() + 60
            while len(chunked._waiting) < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
        return done

    def forward_failing_once(ids, positions):  # the three prompts' joint pass fails, its keys written
        hidden = forward(ids, positions)
        if seen.count(3) == 1 and seen[-1] == 3:
            raise RuntimeError("a pass that fails")
        return hidden

    monkeypatch.setattr(runner, "_pass", pass_then_wait)
    monkeypatch.setattr(runner, "forward", forward_failing_once)

    async def run() -> list[list[Chunk]]:
        long = Reader(chunked, request(chunked, prompts[0], sampling=SCORED))
        await asyncio.to_thread(filled.wait, 60)
        short = await asyncio.gather(
            long.task, *[chunks(chunked, request(chunked, p, sampling=SCORED)) for p in prompts[1:]]
        )
        return [long.chunks, *short[1:]]

    found = asyncio.run(run())
    # The long prompt's last part and the short prompts shared a pass (failing, then each alone) mid-fill.
    assert seen[:5] == [1, 3, 1, 1, 1]
    for got, expected in zip(found, alone, strict=True):  # the same tokens, scored alike: the same keys attended
        scored = [(p.token, round(p.logprob, 4)) for chunk in got for p in chunk.logprobs]
        assert scored == [(p.token, round(p.logprob, 4)) for chunk in expected for p in chunk.logprobs]


def hold_until_waiting(engine: TransformersEngine, count: int, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """A fault point: the worker's next admission waits until COUNT generations are queued; set once it has."""
    admission, held = engine._admission, threading.Event()
    admit = admission.admit

    def admit_when_all_wait(waiting, running):
        if not held.is_set() and any(w.request.request_id.startswith("burst") for w in waiting):
            deadline = time.monotonic() + 60
            while len(waiting) < count and time.monotonic() < deadline:
                time.sleep(0.001)
            held.set()
        return admit(waiting, running)

    monkeypatch.setattr(admission, "admit", admit_when_all_wait)
    return held


def burst(prompt: list[int], number: int, sampling: Sampling, priority: int = 0) -> GenerateRequest:
    return GenerateRequest(f"burst-{number}", tuple(prompt), None, sampling, priority)


def test_a_burst_of_prompts_is_prefilled_within_the_budget_while_running_rows_get_a_token_every_step(
    tiny_base, monkeypatch
):
    engine = TransformersEngine(
        tiny_base, model_id="tiny", quantize="none", max_batch=12, prefill_chunk=16, max_batched_tokens=48
    )
    try:
        passes = record_passes(engine, monkeypatch)
        hold_until_waiting(engine, 8, monkeypatch)
        prompt = engine.encode(" ".join(["fox"] * 40))[:12]  # 12 tokens: four fill a pass of 48

        async def run() -> list[str]:
            running = [Reader(engine, request(engine, p, sampling=RUNNING)) for p in ("Hello there", "Once upon")]
            await asyncio.gather(*(r.started.wait() for r in running))
            await asyncio.gather(*(chunks(engine, burst(prompt, i, LONG)) for i in range(8)))
            await asyncio.gather(*(r.task for r in running))
            return [r.request.request_id for r in running]

        running_ids = set(asyncio.run(run()))
    finally:
        asyncio.run(engine.close())
    filling = [p for p in passes if any(rid.startswith("burst") for rid, _ in p.parts)]
    assert all(p.tokens <= 48 for p in passes)
    assert len(filling) == 3  # 96 prompt tokens, beside the running rows' tokens (2, then 5, then 8) in 48 a pass
    # Every pass of the burst gave both running rows their next token.
    assert all(p.running >= running_ids for p in filling)


def passes_of_a_burst(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[list[int]], list[GenerateRequest]]
) -> list[Pass]:
    """The passes of an engine with a budget of 48 while the requests MAKE gives for a 12-token prompt run, every one
    of them queued before the first is admitted."""
    engine = TransformersEngine(tiny_base, model_id="tiny", quantize="none", max_batch=8, max_batched_tokens=48)
    try:
        passes = record_passes(engine, monkeypatch)
        requests = make(engine.encode(" ".join(["fox"] * 40))[:12])  # 12 tokens: four fill a pass of 48
        hold_until_waiting(engine, len(requests), monkeypatch)

        async def run() -> None:
            await asyncio.gather(*(chunks(engine, r) for r in requests))

        asyncio.run(run())
    finally:
        asyncio.run(engine.close())
    return passes


def test_prompts_ready_in_one_pass_go_by_priority_then_age(tiny_base, monkeypatch):
    def make(prompt: list[int]) -> list[GenerateRequest]:
        # The youngest comes from a tenant with nothing else waiting (priority 0); the others from one with a queue.
        requests = [burst(prompt, i, LONG, priority=i + 1) for i in range(7)]
        return [*requests, burst(prompt, 7, LONG, priority=0)]

    passes = passes_of_a_burst(tiny_base, monkeypatch, make)
    assert [rid for rid, _ in passes[0].parts] == ["burst-7", "burst-0", "burst-1", "burst-2"]
    assert [rid for rid, _ in passes[1].parts] == ["burst-3", "burst-4", "burst-5", "burst-6"]


def test_a_tenants_lone_prompt_beside_another_tenants_queue_takes_a_pass_of_its_own(tiny_base, monkeypatch):
    def make(prompt: list[int]) -> list[GenerateRequest]:
        # Tenant a has five prompts in the engine, tenant b one, the youngest.
        requests = [replace(burst(prompt, i, LONG, priority=i), tenant="a") for i in range(5)]
        return [*requests, replace(burst(prompt, 5, LONG), tenant="b")]

    passes = passes_of_a_burst(tiny_base, monkeypatch, make)
    filled = [[rid for rid, _ in p.parts] for p in passes if p.parts]
    assert filled[0] == ["burst-5"]  # b's first token waits for one short pass, not a full one of a's prompts
    assert filled[1][:3] == ["burst-0", "burst-1", "burst-2"]  # then a's queue, in a full pass (never two lone ones)
    assert passes[1].running == {"burst-5"} and passes[1].tokens == 48


def test_a_short_request_is_admitted_while_a_long_one_waits_for_blocks(tiny_base, monkeypatch):
    from transformers import AutoConfig

    blocks = 20
    config = AutoConfig.from_pretrained(tiny_base)
    engine = TransformersEngine(
        tiny_base, model_id="tiny", quantize="none", max_batch=4, kv_cache_gb=blocks * block_bytes(config) / (1 << 30)
    )
    try:
        assert engine.kv_blocks == blocks
        admitted: list[list[str]] = []
        admit = engine._runner.admit
        monkeypatch.setattr(
            engine._runner, "admit", lambda gs: (gs and admitted.append([g.request.request_id for g in gs]), admit(gs))
        )
        hold_until_waiting(engine, 4, monkeypatch)
        long_ids = long_prompt(engine)[:80]
        long = Sampling(max_tokens=60, temperature=0, ignore_eos=True)  # 140 tokens: 9 blocks each
        short = Sampling(max_tokens=4, temperature=0, ignore_eos=True)  # 1 block
        jobs = [burst(long_ids, i, long) for i in range(3)] + [burst([1, 2, 3], 3, short)]

        async def run() -> None:
            await asyncio.gather(*(chunks(engine, job) for job in jobs))

        asyncio.run(run())
        with pytest.raises(InvalidRequest, match="blocks"):  # more than the whole cache: refused at once
            engine.check(burst(long_ids, 9, Sampling(max_tokens=300)))
    finally:
        asyncio.run(engine.close())
    # Two long ones filled the 18 blocks long ones may hold of 20; the third waited, the short one went past it.
    assert admitted[0] == ["burst-0", "burst-1", "burst-3"]
    assert admitted[1:] == [["burst-2"]]
