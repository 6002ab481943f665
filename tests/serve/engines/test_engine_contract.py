"""The engine contract: every engine (the fake, transformers, vLLM when installed) passes these same tests."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapterctl.serve.engines.base import (
    AdapterLoadFailed,
    AdapterSpec,
    Chunk,
    Engine,
    EngineDead,
    EngineError,
    GenerateRequest,
    InvalidRequest,
    Sampling,
)

from engines import GREEDY, VLLM, chunks, request, text

PROMPTS = ["Hello there, how are you", "The capital of France is", "1 2 3 4 5 6 7 8 9 10", "Write a poem"]
_ids = itertools.count()


@dataclass
class Subject:
    """An engine under test (two adapter places) and adapters it can serve, one per seed."""

    engine: Engine
    adapter: Callable[[int], AdapterSpec]
    # Adapters one batch may run at once: the places (max_loaded), or a row each (the transformers engine).
    batch_adapters: int = 2


@pytest.fixture(scope="module", params=["fake", "transformers", VLLM])
def subject(request: pytest.FixtureRequest, lora: Callable[..., AdapterSpec]) -> Iterator[Subject]:
    if request.param == "vllm":
        yield Subject(request.getfixturevalue("vllm_engine"), lora)  # one per session; it closes at the end
        return
    if request.param == "fake":
        from fake_engine import FakeEngine

        engine: Engine = FakeEngine(max_loaded=2, max_batch=8)
    else:
        from adapterctl.serve.engines.transformers.engine import TransformersEngine

        engine = TransformersEngine(
            request.getfixturevalue("tiny_base"), model_id="tiny", quantize="none", max_loaded=2, max_batch=8
        )
    yield Subject(engine, lora, batch_adapters=8 if request.param == "transformers" else 2)
    asyncio.run(engine.close())


def texts(engine: Engine, jobs: list[tuple[AdapterSpec | None, str, Sampling]]) -> list[str]:
    """Run (adapter, prompt, sampling) jobs all at once; their texts in order."""

    async def run() -> list[str]:
        return await asyncio.gather(*[text(engine, request(engine, p, a, s)) for a, p, s in jobs])

    return asyncio.run(run())


async def settled(engine: Engine) -> None:
    """Wait until nothing runs or waits in ENGINE (rows freed after an abort leave at the next step)."""
    for _ in range(2000):
        status = engine.status()
        if not status.running and not status.waiting:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"still busy: {engine.status()}")


def test_the_engine_states_the_batch_it_runs(subject: Subject) -> None:
    """Tenants' fair share holds generations above any engine that states its batch (serve/engines/fairness.py)."""
    assert subject.engine.max_batch in (8, 16)  # as the fixtures build them: 8 rows, or 16 for the vLLM engine


def test_chunks_come_in_order_and_only_the_last_carries_a_finish_reason(subject: Subject) -> None:
    engine = subject.engine
    got = asyncio.run(chunks(engine, request(engine, PROMPTS[0], subject.adapter(1))))
    assert [c.finish_reason for c in got[:-1]] == [None] * (len(got) - 1) and got[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in got) == GREEDY.max_tokens
    assert all(0 <= t < engine.vocab_size for c in got for t in c.token_ids)


def test_greedy_is_deterministic_and_adapters_change_the_answer(subject: Subject) -> None:
    engine, adapter = subject.engine, subject.adapter
    jobs = [(None, PROMPTS[1], GREEDY), (adapter(1), PROMPTS[1], GREEDY), (adapter(2), PROMPTS[1], GREEDY)]
    first = texts(engine, jobs)
    assert texts(engine, jobs) == first
    assert len(set(first)) == 3


def test_every_row_of_a_mixed_batch_gets_what_it_gets_alone_base_rows_included(subject: Subject) -> None:
    """Both adapter places full, base rows in the same batch: no row may come back as another's adapter."""
    engine, adapter = subject.engine, subject.adapter
    jobs = [(a, p, GREEDY) for p in PROMPTS for a in (None, adapter(1), adapter(2))]
    alone = [texts(engine, [job])[0] for job in jobs]
    passes = sum(engine.status().passes.values())
    assert texts(engine, jobs) == alone
    status = engine.status()
    assert sum(status.passes.values()) > passes and max(status.passes) > 3  # rows of several adapters in one pass


def test_seeds_make_sampling_reproducible(subject: Subject) -> None:
    engine = subject.engine
    sampled = [Sampling(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True) for seed in (7, 7, 8)]
    a, b, c = texts(engine, [(subject.adapter(1), PROMPTS[2], s) for s in sampled])
    assert a == b and a != c


def test_a_stop_string_ends_the_text_before_it(subject: Subject) -> None:
    engine = subject.engine
    whole = texts(engine, [(None, PROMPTS[3], GREEDY)])[0]
    stop = whole[len(whole) // 2 :][:2]
    assert stop.strip(), whole
    sampling = Sampling(max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True, stop=(stop,))
    got = asyncio.run(chunks(engine, request(engine, PROMPTS[3], None, sampling)))
    assert "".join(c.text for c in got) == whole[: whole.index(stop)] and got[-1].finish_reason == "stop"


def test_paused_holds_every_step_until_it_lets_go(subject: Subject) -> None:
    """`paused` (a hook for tests and operators): a running generation and one that arrives meanwhile make no step
    while it holds, then both go on to the text they get alone."""
    engine = subject.engine
    long = Sampling(max_tokens=40, temperature=0, ignore_eos=True)
    jobs = [(subject.adapter(1), PROMPTS[0], long), (None, PROMPTS[1], GREEDY)]
    alone = [texts(engine, [job])[0] for job in jobs]

    async def run() -> tuple[list[str], int]:
        generations = [aiter(engine.generate(request(engine, p, a, s))) for a, p, s in jobs]
        first = [await anext(generations[0])]
        with engine.paused():
            arrived = asyncio.ensure_future(anext(generations[1]))  # queued while the engine holds
            await asyncio.sleep(0.3)
            moved = arrived.done()
        rest = [[c async for c in generations[0]], [await arrived] + [c async for c in generations[1]]]
        return ["".join(c.text for c in first + rest[0]), "".join(c.text for c in rest[1])], moved

    got, moved = asyncio.run(run())
    assert not moved and got == alone


def test_abort_ends_a_generation_without_a_finish_reason_and_frees_its_row(subject: Subject) -> None:
    engine = subject.engine
    long = Sampling(max_tokens=400, temperature=0, ignore_eos=True)

    async def run() -> list[Chunk]:
        generation = request(engine, PROMPTS[0], subject.adapter(1), long)
        stream = aiter(engine.generate(generation))
        got = [await anext(stream)]
        await engine.abort(generation.request_id)
        got += [chunk async for chunk in stream]
        await engine.abort("no-such-request")  # unknown ids are ignored
        await settled(engine)
        return got

    got = asyncio.run(run())
    assert len(got) < 400 and all(c.finish_reason is None for c in got)
    assert texts(engine, [(None, PROMPTS[0], GREEDY)])[0]  # still serving


def test_leaving_the_iteration_early_frees_the_row(subject: Subject) -> None:
    engine = subject.engine
    long = Sampling(max_tokens=400, temperature=0, ignore_eos=True)

    async def run() -> None:
        stream = engine.generate(request(engine, PROMPTS[1], None, long))
        async for _ in stream:
            break
        await stream.aclose()
        await settled(engine)

    asyncio.run(run())


def test_logprobs_and_prompt_logprobs_come_with_the_tokens(subject: Subject) -> None:
    engine = subject.engine
    sampling = Sampling(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    generation = request(engine, PROMPTS[0], subject.adapter(2), sampling)
    got = asyncio.run(chunks(engine, generation))
    scored = [t for c in got for t in c.logprobs]
    assert [t.token for t in scored] == [t for c in got for t in c.token_ids]
    for t in scored:
        assert t.logprob <= 0 and len(t.top) == 3 and t.top[0][1] >= t.logprob - 1e-4  # greedy picks the top one
    prompt = got[0].prompt_logprobs
    assert prompt is not None and [t.token for t in prompt] == list(generation.prompt_ids[1:])
    assert all(len(t.top) == 2 for t in prompt) and all(c.prompt_logprobs is None for c in got[1:])


def test_a_logit_bias_and_penalties_change_what_is_picked(subject: Subject) -> None:
    engine = subject.engine
    token = engine.encode(" the", add_special_tokens=False)[-1]
    biased = Sampling(max_tokens=4, temperature=0, ignore_eos=True, logit_bias=((token, 100.0),))
    got = asyncio.run(chunks(engine, request(engine, PROMPTS[2], None, biased)))
    assert [t for c in got for t in c.token_ids] == [token] * 4
    penalised = Sampling(max_tokens=4, temperature=0, ignore_eos=True, logit_bias=((token, 100.0),), presence_penalty=2)
    assert texts(engine, [(None, PROMPTS[2], penalised)]) == texts(engine, [(None, PROMPTS[2], biased)])  # 100 > 2
    repeated = Sampling(max_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=2.0)
    plain = texts(engine, [(None, PROMPTS[2], Sampling(max_tokens=24, temperature=0, ignore_eos=True))])[0]
    assert texts(engine, [(None, PROMPTS[2], repeated)])[0] != plain


def test_input_no_model_can_run_is_refused_before_anything_runs(subject: Subject) -> None:
    engine = subject.engine
    for ids, message in (
        ((), "The prompt is empty"),
        ((engine.vocab_size,), "outside this model's vocabulary"),
        ((1,) * engine.context_length, "the context holds"),
    ):
        bad = GenerateRequest(f"bad{next(_ids)}", ids, None, GREEDY)
        with pytest.raises(InvalidRequest, match=message):
            engine.check(bad)
        with pytest.raises(InvalidRequest, match=message):
            asyncio.run(chunks(engine, bad))
    with pytest.raises(InvalidRequest, match="logit_bias"):
        engine.check(request(engine, PROMPTS[0], None, Sampling(max_tokens=2, logit_bias=((engine.vocab_size, 1),))))
    assert engine.status().running == 0


def test_an_adapter_the_engine_cannot_load_fails_its_requests_only(subject: Subject, tmp_path: Path) -> None:
    engine = subject.engine
    pickled = tmp_path / "pickled"
    shutil.copytree(subject.adapter(1).path, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    broken = AdapterSpec("pickled", "v1.0.0", pickled)
    with pytest.raises(AdapterLoadFailed, match="pickled@v1.0.0 cannot be served: .*safetensors"):
        asyncio.run(engine.load(broken))

    async def both() -> tuple[BaseException | None, str]:
        bad, good = chunks(engine, request(engine, PROMPTS[0], broken)), text(engine, request(engine, PROMPTS[0], None))
        results = await asyncio.gather(bad, good, return_exceptions=True)
        return results[0] if isinstance(results[0], BaseException) else None, results[1]

    error, good = asyncio.run(both())
    assert isinstance(error, AdapterLoadFailed) and good
    assert broken.key not in engine.status().loaded


def test_load_unload_and_the_lru_never_evict_an_adapter_in_use(subject: Subject) -> None:
    engine, adapter = subject.engine, subject.adapter
    for seed in (3, 4):
        asyncio.run(engine.load(adapter(seed)))
    assert list(engine.status().loaded) == [adapter(3).key, adapter(4).key]
    assert asyncio.run(engine.load(adapter(4))) is False  # already loaded: now the most recently used
    before = engine.status()
    assert asyncio.run(engine.load(adapter(5))) is True
    after = engine.status()
    assert list(after.loaded) == [adapter(4).key, adapter(5).key]  # the least recently used went
    assert after.evictions == before.evictions + 1 and after.loads == before.loads + 1
    assert asyncio.run(engine.unload(adapter(5).key)) is True and adapter(5).key not in engine.status().loaded
    assert asyncio.run(engine.unload("nobody@v1.0.0")) is False
    assert asyncio.run(engine.loaded()) == list(engine.status().loaded)

    # Two long generations hold both places, and unload refuses them. A third adapter waits until one finishes,
    # unless a batch may run more adapters than there are places: then it joins the running batch at once.
    joins = subject.batch_adapters > 2  # then the holders run long, so that the third surely starts before their end
    long = Sampling(max_tokens=400 if joins else 40, temperature=0, ignore_eos=True)

    async def third_waits() -> tuple[int, bool]:
        holders = [aiter(engine.generate(request(engine, PROMPTS[0], adapter(s), long))) for s in (6, 7)]
        counts = [len((await anext(h)).token_ids) for h in holders]  # both run: both places are taken
        refused = not await engine.unload(adapter(6).key)
        third = asyncio.ensure_future(text(engine, request(engine, PROMPTS[0], adapter(8))))
        while not third.done():
            for i, holder in enumerate(holders):
                chunk = await anext(holder, None)
                counts[i] += len(chunk.token_ids) if chunk else 0
            if max(counts) >= long.max_tokens:
                break
        held_until = max(counts)
        assert await third
        return held_until, refused

    held_until, refused = asyncio.run(third_waits())
    assert refused and (held_until < long.max_tokens if joins else held_until == long.max_tokens)
    asyncio.run(settled(engine))
    assert len(engine.status().loaded) <= 2  # once idle, no more than max_loaded stay


def test_two_versions_of_one_adapter_are_served_side_by_side_and_swapped(subject: Subject) -> None:
    engine = subject.engine
    old = AdapterSpec("swap", "v1.0.0", subject.adapter(1).path)
    new = AdapterSpec("swap", "v1.1.0", subject.adapter(2).path)
    jobs = [(old, PROMPTS[0], GREEDY), (new, PROMPTS[0], GREEDY)]
    together = texts(engine, jobs)
    assert together == [texts(engine, [job])[0] for job in jobs] and together[0] != together[1]
    assert asyncio.run(engine.unload(old.key)) is True
    assert old.key not in engine.status().loaded and texts(engine, jobs[1:]) == together[1:]


def test_status_reports_the_queue_and_the_adapters_of_running_requests(subject: Subject) -> None:
    engine = subject.engine
    long = Sampling(max_tokens=200, temperature=0, ignore_eos=True)

    async def run() -> None:
        generation = request(engine, PROMPTS[0], subject.adapter(1), long)
        stream = aiter(engine.generate(generation))
        await anext(stream)
        status = engine.status()
        assert status.running == 1 and status.running_adapters == (subject.adapter(1).key,)
        assert subject.adapter(1).key in status.loaded and status.max_loaded == 2
        await engine.abort(generation.request_id)
        await settled(engine)

    asyncio.run(run())


@pytest.fixture(params=["fake", "transformers"])
def mortal(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Engine, Callable[[], None]]]:
    """A fresh engine of its own and its fault point: the next batch step of its worker meets a Fault no handler
    catches (vLLM's engine core dying is in test_vllm_engine.py: it is a process to kill)."""
    from faultpoint import raising

    if request.param == "fake":
        from fake_engine import FakeEngine

        engine: Any = FakeEngine(max_loaded=2, max_batch=8)
        owner, name = engine, "_step"
    else:
        from adapterctl.serve.engines.transformers.engine import TransformersEngine

        engine = TransformersEngine(
            request.getfixturevalue("tiny_base"), model_id="tiny", quantize="none", max_loaded=2, max_batch=8
        )
        owner, name = engine._runner, "step"
    yield engine, lambda: monkeypatch.setattr(owner, name, raising(getattr(owner, name), 1))
    asyncio.run(engine.close())


def test_an_engine_whose_worker_died_fails_every_generation_and_says_it_is_dead(
    mortal: tuple[Engine, Callable[[], None]], lora: Callable[..., AdapterSpec]
) -> None:
    engine, fault = mortal
    long = Sampling(max_tokens=400, temperature=0, ignore_eos=True)

    async def run() -> list[BaseException | list[Chunk]]:
        running = aiter(engine.generate(request(engine, PROMPTS[0], lora(1), long)))
        first = await anext(running)
        fault()
        queued = [chunks(engine, request(engine, p, None, long)) for p in PROMPTS[1:3]]
        rest = [chunk async for chunk in _until_error(running)]
        return [*await asyncio.gather(*queued, return_exceptions=True), [first, *rest]]

    *queued, ran = asyncio.run(run())
    assert all(isinstance(error, EngineDead) for error in queued), queued
    assert isinstance(ran[-1], EngineDead) and len(ran) < 400  # the running one ended with the error
    reason = engine.dead
    assert reason and "Fault" in reason and str(ran[-1]) == str(EngineDead(reason))
    assert "engine died" in str(ran[-1]) and "shutting down" in str(ran[-1])
    with pytest.raises(EngineDead):
        engine.check(request(engine, PROMPTS[0]))
    with pytest.raises(EngineDead):
        asyncio.run(chunks(engine, request(engine, PROMPTS[0])))
    with pytest.raises(EngineDead):
        asyncio.run(engine.load(lora(2)))


async def _until_error(stream: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
    """STREAM's chunks, then the error that ended it as a last item."""
    try:
        async for chunk in stream:
            yield chunk
    except EngineError as exc:
        yield exc
