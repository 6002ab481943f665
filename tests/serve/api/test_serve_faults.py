"""Fault injection over real HTTP: no request and no adapter can end the server, wedge its batch loop or fail
another request; what no engine can take is refused at the door, and `adapters add` refuses broken adapters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from engines import VLLM, chunks, request
from serving import Server, crafted, events, registry_with, reweighted, server_process, serving, wait_for

from adapterctl.registry.repo import Registry
from adapterctl.serve.engines.transformers.kvcache import BLOCK, MIN_BLOCKS

PROMPT = "The quick brown fox"


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")


def _int8(tensors: dict[str, torch.Tensor]) -> None:
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].mul(100).to(torch.int8)


def _huge(tensors: dict[str, torch.Tensor]) -> None:
    """Finite weights (as a diverged training leaves them) whose products overflow float32 inside the model."""
    for name in tensors:
        tensors[name] = tensors[name] * 1e30


# Adapters no engine can serve: (config edit, tensor edit, the reason `adapters add` and the server give).
BROKEN: dict[str, tuple[Callable[[dict], None] | None, Callable[[dict], None] | None, str]] = {
    "rank-zero": (lambda c: c.update(r=0), None, "'r' is 0; a LoRA rank is a whole number of at least 1"),
    "alpha-word": (
        lambda c: c.update(lora_alpha="sixteen"),
        None,
        "'lora_alpha' is 'sixteen'; it must be a finite number",
    ),
    "nan-weights": (None, _nan, "holds NaN or infinite values; the adapter is broken"),
    "int8-weights": (None, _int8, "is I8; LoRA weights must be F16, BF16, F32 or F64"),
    "rank-pattern": (
        lambda c: c.update(rank_pattern={"q_proj": "eight"}),
        None,
        "'rank_pattern' gives 'q_proj' the value 'eight'; it must be a rank of at least 1",
    ),
    "alpha-pattern": (lambda c: c.update(alpha_pattern={"q_proj(": 16}), None, "key 'q_proj(' is not a valid pattern"),
    "pair-rank": (lambda c: c.update(rank_pattern={"v_proj": 2}), None, "is not of rank 2, as the config says"),
}


def broken(source: Path, dest: Path, name: str) -> Path:
    """A copy of the good adapter folder SOURCE broken the way BROKEN[NAME] says."""
    edit_config, edit_tensors, _ = BROKEN[name]
    if edit_tensors is not None:
        return reweighted(source, dest, edit_tensors)
    return crafted(source, dest, lambda config, _: edit_config(config))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, make_adapter: Any) -> Registry:
    """A registry with good adapters, one whose weights overflow, and BROKEN's adapters, registered as an older
    `adapters add` that checked less would have registered them (its config and weight checks switched off)."""
    from adapterctl.registry import folder

    root = tmp_path_factory.mktemp("faults")
    folders = {
        "good-a": [make_adapter(1)],
        "good-b": [make_adapter(2)],
        "overflow": [reweighted(make_adapter(3), root / "overflow", _huge)],
    }
    registry = registry_with(root / "registry", folders)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(folder, "lora_settings", lambda config, where: None)
        patch.setattr(folder, "_check_weights", lambda *args: None)
        for name in BROKEN:
            registry.add(name, broken(make_adapter(4), root / f"broken-{name}", name))
    return registry


@pytest.fixture(scope="module", params=["none", "nf4"])
def served(request: pytest.FixtureRequest, adapters: Registry, tiny_base: Path) -> Iterator[Server]:
    """A server on the tiny base, unquantized and NF4, serving the registry's good and broken adapters."""
    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    engine = TransformersEngine(tiny_base, model_id="tiny-llama", quantize=request.param, max_loaded=4, max_batch=8)
    with serving(engine, adapters, tiny_base, settings={"max_tokens_cap": 512}) as server:
        yield server


def call(url: str, body: dict[str, Any], chat: bool = False) -> tuple[int, str]:
    """(status, text or error message) of one request; an error event ending a stream counts as a 500."""
    endpoint = f"{url}/v1/{'chat/completions' if chat else 'completions'}"
    content = json.dumps(body)  # json.dumps writes NaN, as a careless client does
    headers = {"content-type": "application/json"}
    if body.get("stream"):
        with httpx.stream("POST", endpoint, content=content, headers=headers, timeout=120) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, response.json()["error"]["message"]
            data = events(response)
        failed = [d for d in data if isinstance(d, dict) and "error" in d]
        if failed:
            return 500, failed[0]["error"]["message"]
        assert data[-1] == "[DONE]", data
        pieces = [c["choices"][0] for c in data[:-1] if c["choices"]]
        return 200, "".join(p.get("text") or p.get("delta", {}).get("content") or "" for p in pieces)
    response = httpx.post(endpoint, content=content, headers=headers, timeout=120)
    if response.status_code != 200:
        return response.status_code, response.json()["error"]["message"]
    choice = response.json()["choices"][0]
    return 200, choice["text"] if "text" in choice else choice["message"]["content"]


def greedy(model: str, prompt: str = PROMPT, **options: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True, **options}


def healthy(url: str, base: str = "tiny-llama") -> None:
    """The process answers and its batch loop still serves: a base request completes (a wedged loop times out)."""
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    assert call(url, greedy(base, max_tokens=2))[0] == 200


def test_fields_no_engine_can_take_are_400_before_the_engine(served: Server, monkeypatch: Any) -> None:
    submitted: list[Any] = []  # what reached the engine: a fault point on its check and its generate
    engine = served.engine
    check, generate = engine.check, engine.generate
    monkeypatch.setattr(engine, "check", lambda request: (submitted.append(request), check(request))[1])
    monkeypatch.setattr(engine, "generate", lambda request: (submitted.append(request), generate(request))[1])
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (greedy("good-a", prompt=""), "The prompt is empty: send at least one token of text."),
        (greedy("tiny-llama", prompt=[""]), "The prompt is empty"),
        (greedy("good-a", seed=1 << 64), "seed: Input should be less than or equal to 9223372036854775807"),
        (greedy("good-a", seed=1 << 63), "seed: Input should be less than or equal to 9223372036854775807"),
        (greedy("good-a", seed=-(1 << 63) - 1), "seed: Input should be greater than or equal to -9223372036854775808"),
        (greedy("good-a", temperature=float("nan")), "temperature: Input should be a finite number"),
        (greedy("good-a", temperature=1e400), "temperature: Input should be a finite number"),
        (greedy("good-a", top_p=float("nan")), "top_p: Input should be a finite number"),
        ({**chat, "temperature": float("-inf")}, "temperature: Input should be a finite number"),
    ]
    for body, message in cases:
        status, error = call(served.url, body, chat="messages" in body)
        assert (status, message in error) == (400, True), (body, error)
    assert submitted == []  # none reached the engine
    assert call(served.url, greedy("good-a", seed=(1 << 63) - 1, temperature=1))[0] == 200  # the edges are fine
    assert call(served.url, greedy("good-a", seed=-(1 << 63), temperature=1))[0] == 200
    healthy(served.url)


def test_a_temperature_below_a_hundredth_samples_at_a_hundredth(served: Server) -> None:
    sampled = {"model": "good-b", "prompt": PROMPT, "max_tokens": 24, "seed": 11}
    tiny = call(served.url, {**sampled, "temperature": 1e-40})
    assert tiny == call(served.url, {**sampled, "temperature": 0.01}) and tiny[0] == 200
    assert call(served.url, {**sampled, "temperature": 5e-324})[0] == 200  # the smallest double


def test_an_engine_refuses_what_it_cannot_run_even_past_the_http_checks(served: Server) -> None:
    from adapterctl.serve.engines.base import InvalidRequest, Sampling

    sampling = Sampling(max_tokens=2)
    for ids, message in (
        ([], "The prompt is empty"),
        ([1 << 40], "token ids outside this model's vocabulary"),
        ([1] * served.engine.context_length, "the context holds"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            served.engine.check(request(served.engine, ids, None, sampling))
        with pytest.raises(InvalidRequest, match=message):  # generate checks too, before anything is queued
            asyncio.run(chunks(served.engine, request(served.engine, ids, None, sampling)))
    biased = Sampling(max_tokens=2, logit_bias=((1 << 40, 1.0),))
    with pytest.raises(InvalidRequest, match="logit_bias names token ids outside") as info:
        served.engine.check(request(served.engine, [1], None, biased))
    assert info.value.param == "logit_bias"
    for bad in ({"seed": 1 << 64}, {"temperature": float("nan")}, {"top_p": 0.0}, {"max_tokens": 0}):
        with pytest.raises(ValueError):
            Sampling(**{"max_tokens": 2, **bad})
    healthy(served.url)


def test_adapters_no_engine_can_serve_are_422_and_running_streams_carry_on(served: Server) -> None:
    alone = call(served.url, greedy("good-a", max_tokens=120, stream=True))
    body = json.dumps(greedy("good-a", max_tokens=120, stream=True))
    headers = {"content-type": "application/json"}
    with httpx.stream("POST", f"{served.url}/v1/completions", content=body, headers=headers, timeout=120) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))  # generating now
        for name, (_, _, reason) in BROKEN.items():
            status, error = call(served.url, greedy(name))
            assert status == 422 and f"{name}@v1.0.0 cannot be served: " in error and reason in error, error
            healthy(served.url)  # the next base request is not held by the refused load
        rest = [first, *[line for line in lines if line.startswith("data: ")]]
    chunks = [json.loads(line[6:]) for line in rest[:-1]]
    assert rest[-1] == "data: [DONE]" and "".join(c["choices"][0]["text"] for c in chunks) == alone[1]


def test_an_adapter_whose_output_is_not_finite_fails_its_own_requests_only(served: Server) -> None:
    alone = {model: call(served.url, greedy(model, max_tokens=40)) for model in ("good-a", "tiny-llama")}
    jobs = [greedy("overflow", max_tokens=40), greedy("good-a", max_tokens=40), greedy("tiny-llama", max_tokens=40)]
    jobs += [greedy("overflow", max_tokens=40, stream=True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda body: call(served.url, body), jobs))
    message = "not finite (NaN or inf) with adapter overflow@v1.0.0; it was stopped"
    assert results[0][0] == 500 and message in results[0][1]
    assert results[3][0] == 500 and message in results[3][1]  # a stream: its error event
    assert results[1] == alone["good-a"] and results[2] == alone["tiny-llama"]
    healthy(served.url)


def test_twenty_mixed_good_and_bad_requests_at_once_good_ones_answer_as_alone(served: Server) -> None:
    chat = {"messages": [{"role": "user", "content": "Tell me about foxes."}], "max_tokens": 20, "temperature": 0}
    good: list[tuple[dict[str, Any], bool]] = [
        (greedy("good-a", max_tokens=30), False),
        (greedy("good-b", max_tokens=50, stream=True), False),
        (greedy("tiny-llama", max_tokens=40), False),
        ({"model": "good-b", **chat}, True),
        ({"model": "tiny-llama", **chat, "stream": True}, True),
        ({"model": "good-a", "prompt": PROMPT, "max_tokens": 30, "temperature": 0.9, "seed": 3}, False),
        ({"model": "good-b", "prompt": "Once upon", "max_tokens": 20, "temperature": 1e-40, "seed": 4}, False),
        (greedy("good-a", prompt="1 2 3 4", max_tokens=60, stream=True), False),
        (greedy("tiny-llama", prompt="x" * 2000, max_tokens=8), False),
        (greedy("good-b", prompt="Hello", max_tokens=12, stop=["zz"]), False),
    ]
    too_long = "x" * (served.engine.prompt_characters + 1)
    bad: list[tuple[dict[str, Any], int, str]] = [
        (greedy("good-a", prompt=""), 400, "The prompt is empty"),
        (greedy("tiny-llama", prompt=""), 400, "The prompt is empty"),
        (greedy("good-b", seed=1 << 64), 400, "seed: Input should be less than"),
        (greedy("good-a", temperature=float("nan")), 400, "temperature: Input should be a finite number"),
        (greedy("tiny-llama", prompt=too_long), 400, "characters"),
        (greedy("rank-zero"), 422, "'r' is 0"),
        (greedy("alpha-word"), 422, "'lora_alpha' is 'sixteen'"),
        (greedy("nan-weights"), 422, "NaN or infinite"),
        (greedy("overflow", max_tokens=40), 500, "not finite"),
        (greedy("overflow", max_tokens=40, stream=True), 500, "not finite"),
    ]
    alone = [call(served.url, body, chat) for body, chat in good]
    assert all(status == 200 and text for status, text in alone), alone
    jobs = [(body, chat) for body, chat in good] + [(body, False) for body, _, _ in bad]
    start = threading.Barrier(len(jobs))

    def run(job: tuple[dict[str, Any], bool]) -> tuple[int, str]:
        start.wait(60)
        return call(served.url, *job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    assert results[: len(good)] == alone
    for (body, status, message), (got, error) in zip(bad, results[len(good) :], strict=True):
        assert got == status and message in error, (body.get("model"), got, error)
    healthy(served.url)


def test_a_prompt_too_long_for_the_context_is_refused_without_tokenizing(served: Server, monkeypatch: Any) -> None:
    encoded: list[int] = []
    encode = served.engine.encode
    monkeypatch.setattr(served.engine, "encode", lambda text: (encoded.append(len(text)), encode(text))[1])
    limit = served.engine.prompt_characters
    prompt = "x" * (limit + 1)  # just over the bound
    status, error = call(served.url, greedy("good-a", prompt=prompt))
    assert status == 400 and f"{len(prompt)} characters" in error and f"over {limit} characters" in error
    status, error = call(served.url, greedy("good-a", prompt="fox " * (50 << 18)))  # 50 MB: over the body limit
    assert status == 413 and "bytes" in error
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "y" * limit}] * 2}
    assert call(served.url, chat, chat=True)[0] == 400
    assert encoded == []  # none was tokenized
    status, error = call(served.url, greedy("good-a", prompt="fox " * served.engine.context_length))
    assert status == 400 and "context holds" in error and encoded  # under the bound: tokenized, then refused
    healthy(served.url)


def test_tokenizing_a_prompt_does_not_hold_the_event_loop(served: Server, monkeypatch: Any) -> None:
    entered, release = threading.Event(), threading.Event()
    encode = served.engine.encode

    def slow(text: str) -> list[int]:
        entered.set()
        release.wait(60)
        return encode(text)

    monkeypatch.setattr(served.engine, "encode", slow)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call, served.url, greedy("good-a", max_tokens=4))
        try:
            assert entered.wait(60), "the request never reached tokenizing"
            assert httpx.get(f"{served.url}/healthz", timeout=10).status_code == 200  # answered meanwhile
        finally:
            release.set()
        assert pending.result()[0] == 200


def test_a_long_request_gives_its_memory_back(served: Server, monkeypatch: Any) -> None:
    runner, engine = served.engine._runner, served.engine
    cache = runner.cache
    held: list[tuple[int, int, int]] = []  # (blocks held, blocks stored, bytes) at each pass with a running row
    original = runner._pass

    def recorded(rows: list, parts: list) -> Any:
        if rows:
            held.append((cache.held(), cache.blocks, cache.nbytes()))
        return original(rows, parts)

    monkeypatch.setattr(runner, "_pass", recorded)
    prompt = "fox " * (engine.context_length - 200)
    assert call(served.url, greedy("good-b", prompt=prompt, max_tokens=100))[0] == 200
    wait_for(lambda: cache.nbytes() == 0, 10, "the cache to be freed")
    assert len(held) == 99 and held[0][2] > 0
    assert held[0][0] * BLOCK >= engine.context_length - 200  # its prompt's blocks
    assert call(served.url, greedy("good-b", max_tokens=4))[0] == 200
    wait_for(lambda: cache.nbytes() == 0 and cache.blocks == 0, 10, "the short request's blocks to be freed too")
    assert held[-1][:2] == (1, MIN_BLOCKS)  # the short request's row: no trace of the long one's length


def test_a_stream_cut_by_its_client_is_logged_as_499(served: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="serve")
    body = json.dumps(greedy("good-a", max_tokens=400, stream=True))
    headers = {"content-type": "application/json"}
    with contextlib.ExitStack() as held:
        with httpx.stream("POST", f"{served.url}/v1/completions", content=body, headers=headers, timeout=60) as stream:
            request_id = stream.headers["x-request-id"]
            next(line for line in stream.iter_lines() if line.startswith("data: "))
            held.enter_context(served.engine.paused())  # a fault point: no step runs, the stream cannot end
        # Leaving the block closed the connection mid-stream.
        line = wait_for(lambda: [r.getMessage() for r in caplog.records if request_id in r.getMessage()], 10, "its log")
    assert "status=499" in line[0] and int(line[0].split("completion_tokens=")[1].split()[0]) < 400
    healthy(served.url)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_adapters_add_refuses_an_adapter_no_engine_can_serve(
    name: str, registry: Registry, make_adapter: Any, tmp_path: Path, cli: Any
) -> None:
    result = cli("add", name, str(broken(make_adapter(1), tmp_path / name, name)), cwd=registry.root)
    assert result.exit_code == 2 and result.output.startswith("Error: ") and BROKEN[name][2] in result.output
    assert name not in registry.state().adapters


def test_an_nf4_server_process_survives_an_empty_prompt(registry: Registry, make_adapter: Any, tiny_base: Path) -> None:
    registry.add("nf4", make_adapter(1))
    args = ["serve", "--base", str(tiny_base), "--port", "0"]  # the default quantization: NF4
    with server_process(["-m", "adapterctl.cli", *args], registry.root) as (server, url, lines):
        assert "(quantize nf4)" in "".join(lines), "".join(lines)
        base = tiny_base.name  # the base model's id: its folder's name
        for model in (base, "nf4"):
            status, error = call(url, greedy(model, prompt=""))
            assert status == 400 and "The prompt is empty" in error
        assert server.poll() is None  # an empty prompt once ended this process (SIGFPE in the 4-bit matmul)
        healthy(url, base)
        assert call(url, greedy("nf4"))[0] == 200
    assert "status=400" in "".join(lines)


def test_a_broken_folder_planted_after_registering_is_still_refused(served: Server) -> None:
    """The catalog checks a cached folder with the same rules as `adapters add` (the engine once more on reading)."""
    from adapterctl.serve.engines.base import AdapterLoadFailed, AdapterSpec

    catalog = served.catalog
    folder = Path(catalog.cache) / "direct"
    shutil.rmtree(folder, ignore_errors=True)
    catalog.registry.checkout("rank-zero", folder)
    with pytest.raises(AdapterLoadFailed, match="'r' is 0"):
        asyncio.run(served.engine.load(AdapterSpec("direct", "v1.0.0", folder)))  # past the catalog, to the engine
    healthy(served.url)


FAULTPOINT = str(Path(__file__).parents[2] / "faultpoint.py")


def _died(url: str, body: dict[str, Any]) -> str:
    """The error event that ends BODY's stream when the engine dies under it."""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as stream:
        data = events(stream)
    assert "error" in data[-1], data[-1]
    return data[-1]["error"]["message"]


def test_a_dead_batch_loop_turns_the_probes_and_requests_503(tiny_base: Path, registry: Registry, monkeypatch: Any):
    """Fault point: the worker's third step meets an error no handler of the engine catches."""
    from faultpoint import raising

    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    engine = TransformersEngine(tiny_base, model_id="tiny-llama", quantize="none")
    with serving(engine, registry, tiny_base) as server:
        url = server.url
        assert all(httpx.get(f"{url}{probe}").status_code == 200 for probe in ("/readyz", "/health", "/healthz"))
        monkeypatch.setattr(engine._runner, "step", raising(engine._runner.step, 3))
        message = _died(url, greedy("tiny-llama", max_tokens=50))
        assert message == "The engine died (its batch loop stopped on Fault; see the server log); the server is " \
            "shutting down: send the request again."  # fmt: skip
        for probe in ("/readyz", "/health", "/healthz"):
            answer = httpx.get(f"{url}{probe}")
            assert (answer.status_code, answer.json()["error"]["message"]) == (503, message), probe
        assert call(url, greedy("tiny-llama")) == (503, message)


def test_a_replica_whose_engine_died_fails_ray_serves_health_check(tiny_base: Path, monkeypatch: Any) -> None:
    """Fault point: the engine's batch loop dies on its first step. Ray Serve calls a replica's `check_health`
    every few seconds and replaces the replica when it raises (its documented contract, not run here: a fault cannot
    be put inside a replica's process); this checks the replica's side on a real engine."""
    pytest.importorskip("ray", reason="Ray is not installed (the ray extra)")
    from faultpoint import raising

    from engines import chunks, request
    from adapterctl.serve.engines.base import EngineDead
    from adapterctl.serve.ray.replica import EngineReplica
    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    replica = object.__new__(EngineReplica)  # its engine alone: the rest needs a Ray Serve replica context
    replica.engine = TransformersEngine(tiny_base, model_id="tiny-llama", quantize="none")
    replica._stop = threading.Event()  # what its status reporter would stop on
    try:
        replica.check_health()  # alive: passes
        monkeypatch.setattr(replica.engine._runner, "step", raising(replica.engine._runner.step, 1))
        with pytest.raises(EngineDead):
            asyncio.run(chunks(replica.engine, request(replica.engine, "Hello")))
        with pytest.raises(RuntimeError, match=r"^The engine cannot serve any more: its batch loop stopped on Fault"):
            replica.check_health()
    finally:
        asyncio.run(replica.engine.close())


@pytest.mark.parametrize("engine", ["transformers", VLLM])
def test_a_server_whose_engine_died_exits_12_after_answering_its_requests(
    engine: str, tiny_base: Path, registry: Registry
) -> None:
    """Fault points: the transformers engine's third step raises past every handler; vLLM's engine core process
    is killed. Either way the running stream gets the error, and the process exits for its supervisor."""
    import psutil

    args = ["serve", "--base", str(tiny_base), "--port", "0", "--engine", engine, "--max-context", "512"]
    if engine == "vllm":
        pytest.importorskip("vllm")
        command = ["-m", "adapterctl.cli", *args]
    else:
        command = [
            FAULTPOINT,
            "adapterctl.serve.engines.transformers.runner:Runner.step",
            "3",
            *args,
            "--quantize",
            "none",
        ]
    with server_process(command, registry.root) as (server, url, lines):
        body = greedy(tiny_base.name, max_tokens=300)
        if engine == "vllm":
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as stream:
                data = (line for line in stream.iter_lines() if line.startswith("data: "))
                next(data)  # generating now
                [core] = [p for p in psutil.Process(server.pid).children() if "EngineCore" in " ".join(p.cmdline())]
                core.kill()
                message = json.loads([*data][-1][len("data: ") :])["error"]["message"]
        else:
            message = _died(url, body)
        assert message.startswith("The engine died (") and "shutting down" in message
        assert server.wait(60) == 12
    log = "".join(lines)
    assert "The engine died" in log and f"Error: The {engine} engine died (" in log, log[-3000:]
