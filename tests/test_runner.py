"""The transformers engine's batch runner: long prompts prefilled in chunks between decode steps, the row cache's
memory following the rows it holds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines import Reader, chunks, request

from serve.engine import Chunk, Sampling
from serve.transformers_engine import TransformersEngine

LONG = Sampling(max_tokens=6, temperature=0, ignore_eos=True)
RUNNING = Sampling(max_tokens=60, temperature=0, ignore_eos=True)
SCORED = Sampling(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def chunked(tiny_base: Path) -> Iterator[TransformersEngine]:
    built = TransformersEngine(tiny_base, model_id="tiny", quantize="none", max_batch=4, prefill_chunk=64)
    yield built
    asyncio.run(built.close())


def long_prompt(engine: TransformersEngine) -> list[int]:
    """About 900 tokens: fifteen chunks of 64."""
    ids = engine.encode(" ".join(f"line {i} of a long document about foxes." for i in range(100)))
    return ids[:900]


def record_passes(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """(kind, rows, cache bytes) of each pass the runner makes from now on: "chunk" or "decode"."""
    runner, events = engine._runner, []
    chunk, decode = runner._chunk, runner.decode

    def chunk_recorded(row):
        events.append(("chunk", 1, runner.cache.nbytes()))
        chunk(row)

    def decode_recorded():
        events.append(("decode", len(runner.rows), runner.cache.nbytes()))
        decode()

    monkeypatch.setattr(runner, "_chunk", chunk_recorded)
    monkeypatch.setattr(runner, "decode", decode_recorded)
    return events


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


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps_and_gives_the_same_tokens(
    chunked, tiny_base, monkeypatch
):
    prompt = long_prompt(chunked)
    whole = TransformersEngine(tiny_base, model_id="tiny", quantize="none", max_batch=4, prefill_chunk=0)
    try:
        expected_running, expected_long = run_alongside(whole, prompt)
    finally:
        asyncio.run(whole.close())
    events = record_passes(chunked, monkeypatch)
    assert run_alongside(chunked, prompt) == (expected_running, expected_long)  # greedy: token for token
    kinds = [kind for kind, _, _ in events]
    first, last = kinds.index("chunk"), len(kinds) - 1 - kinds[::-1].index("chunk")
    assert kinds.count("chunk") == 15  # 900 tokens in chunks of 64
    # Between its chunks the running row got a token every step: the long prompt never held it for two chunks.
    between = kinds[first : last + 1]
    assert between == ["chunk", "decode"] * 14 + ["chunk"]
    assert all(rows == 1 for kind, rows, _ in events[first:last] if kind == "decode")


def test_the_cache_gives_back_a_long_requests_memory_when_it_ends(chunked, monkeypatch):
    events = record_passes(chunked, monkeypatch)
    run_alongside(chunked, long_prompt(chunked))
    widest = max(i for i, (kind, rows, _) in enumerate(events) if kind == "decode" and rows == 2)
    peak = max(nbytes for _, _, nbytes in events)
    after = [nbytes for kind, rows, nbytes in events[widest + 1 :] if kind == "decode"]
    assert after and peak >= 8 * max(after)  # 2 rows x 1024 tokens while it ran; 1 row of 128 after
    deadline = time.monotonic() + 60  # the worker drops the last row just after sending its last token
    while chunked._runner.cache.nbytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chunked._runner.cache.nbytes() == 0  # no rows, no storage


def test_short_prompts_prefilled_while_a_long_one_is_filled_leave_every_row_its_tokens(chunked, tiny_base, monkeypatch):
    prompts = [long_prompt(chunked)[:100], "Hello there", "Once upon a time"]  # the long one: two chunks of 64
    whole = TransformersEngine(tiny_base, model_id="tiny", quantize="none", max_batch=4, prefill_chunk=0)
    try:
        alone = [asyncio.run(chunks(whole, request(whole, p, sampling=SCORED))) for p in prompts]
    finally:
        asyncio.run(whole.close())
    runner, filled, seen = chunked._runner, threading.Event(), []
    chunk, forward = runner._chunk, runner.forward

    def chunk_then_wait(row):  # the fault point: after the first chunk, hold until both short prompts are queued
        chunk(row)
        if not filled.is_set():
            filled.set()
            deadline = time.monotonic() + 60
            while len(chunked._waiting) < 2 and time.monotonic() < deadline:
                time.sleep(0.001)

    def forward_failing_once(ids, mask, positions):  # the short prompts' joint pass fails, its keys written
        seen.append((len(ids), runner.filling is not None))
        hidden = forward(ids, mask, positions)
        if seen.count((2, True)) == 1 and len(ids) == 2:
            raise RuntimeError("a pass that fails")
        return hidden

    monkeypatch.setattr(runner, "_chunk", chunk_then_wait)
    monkeypatch.setattr(runner, "forward", forward_failing_once)

    async def run() -> list[list[Chunk]]:
        long = Reader(chunked, request(chunked, prompts[0], sampling=SCORED))
        await asyncio.to_thread(filled.wait, 60)
        short = await asyncio.gather(
            long.task, *[chunks(chunked, request(chunked, p, sampling=SCORED)) for p in prompts[1:]]
        )
        return [long.chunks, *short[1:]]

    found = asyncio.run(run())
    # The short prompts were prefilled (together, failing, then each alone) while the long one held its row mid-fill.
    assert seen[:4] == [(1, True), (2, True), (1, True), (1, True)]
    for got, expected in zip(found, alone, strict=True):  # the same tokens, scored alike: the same keys attended
        scored = [(p.token, round(p.logprob, 4)) for chunk in got for p in chunk.logprobs]
        assert scored == [(p.token, round(p.logprob, 4)) for chunk in expected for p in chunk.logprobs]
