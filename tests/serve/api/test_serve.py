"""The server over real HTTP in open mode: the OpenAI client unchanged, streams, many adapters at once,
hot swaps under load, every refusal in OpenAI's error shape, metrics and the request log."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import sha_tree
from serving import Server, crafted, events, metric, registry_with, reweighted, serving, wait_for

from adapterctl.registry.pull import clone
from adapterctl.registry.push import push
from adapterctl.registry.repo import Registry
from adapterctl.serve.catalog.versions import Catalog

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Say something about foxes."}]


@dataclass
class Served:
    """A running open-mode server and the registry it follows."""

    server: Server
    registry: Registry

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def client(self) -> openai.OpenAI:
        return self.server.client

    @property
    def engine(self) -> Any:
        return self.server.engine

    @property
    def catalog(self) -> Catalog:
        return self.server.catalog

    def complete(self, model: str, prompt: str = PROMPT, **options: Any) -> tuple[str, str]:
        """(answering version, text) of one completion, greedy unless OPTIONS say otherwise."""
        options = {"max_tokens": 12, "temperature": 0, **options}
        response = self.client.completions.create(model=model, prompt=prompt, **options)
        return response.model, response.choices[0].text

    def stream(self, model: str, prompt: str = PROMPT, max_tokens: int = 12) -> tuple[set[str], str]:
        """(versions its chunks name, text) of one greedy streamed completion."""
        chunks = list(
            self.client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
            )
        )
        return {chunk.model for chunk in chunks}, "".join(chunk.choices[0].text for chunk in chunks)


def widen(tensors: dict[str, Any]) -> None:
    """Pad every LoRA pair with zeros to rank 128: the same adapter, too wide for a server's --max-rank 64."""
    import torch

    for name, tensor in tensors.items():
        if "lora_A" in name:
            tensors[name] = torch.cat([tensor, tensor.new_zeros(128 - tensor.shape[0], tensor.shape[1])])
        else:
            tensors[name] = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], 128 - tensor.shape[1])], dim=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, make_adapter: Any) -> Iterator[Served]:
    """A server on the tiny base (no quantization) with nine adapter versions, following its registry every 0.5 s."""
    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    root = tmp_path_factory.mktemp("served")
    folders = {
        "alpha": [make_adapter(1), make_adapter(2)],
        "beta": [make_adapter(3)],
        "gamma": [make_adapter(4)],
        "delta": [make_adapter(5)],
        "swap": [make_adapter(6), make_adapter(7)],
        "pickled": [make_adapter(1)],
        "foreign": [
            crafted(
                make_adapter(1),
                root / "foreign",
                lambda c, lin: lin["base_model"].update(fingerprint="sha256:" + "e" * 64),
            )
        ],
        "wide": [
            crafted(
                reweighted(make_adapter(1), root / "wide-weights", widen), root / "wide", lambda c, _: c.update(r=128)
            )
        ],
    }
    registry = registry_with(root / "registry", folders)
    engine = TransformersEngine(tiny_base, model_id="tiny-llama", quantize="none", max_loaded=8, max_batch=32)
    with serving(engine, registry, tiny_base, settings={"max_tokens_cap": 256}) as server:
        yield Served(server, registry)


def test_completions_and_chat_through_the_openai_client(served: Served) -> None:
    engine = served.engine
    completion = served.client.completions.create(model="alpha@v1.0.0", prompt=PROMPT, max_tokens=8, temperature=0)
    assert completion.model == "alpha@v1.0.0" and completion.object == "text_completion"
    choice = completion.choices[0]
    assert choice.text and choice.finish_reason in ("length", "stop")
    assert completion.usage.prompt_tokens == len(engine.encode(PROMPT))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.usage.completion_tokens == 8 or choice.finish_reason == "stop"

    chat = served.client.chat.completions.create(model="beta", messages=CHAT, max_tokens=8, temperature=0)
    assert chat.model == "beta@v1.0.0" and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(engine.encode_chat(CHAT))
    base = served.client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=8, temperature=0)
    assert base.model == "tiny-llama"
    assert base.choices[0].message.content != chat.choices[0].message.content  # the adapter changes the answer


def test_streams_say_the_same_as_whole_answers_and_end_with_usage_and_done(served: Served) -> None:
    whole = served.client.chat.completions.create(model="gamma", messages=CHAT, max_tokens=10, temperature=0)
    body = {"model": "gamma", "messages": CHAT, "max_tokens": 10, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{served.url}/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = events(response)
    assert data[-1] == "[DONE]"
    chunks, usage = data[:-2], data[-2]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gamma@v1.0.0" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason
    assert usage["choices"] == [] and usage["usage"] == whole.usage.model_dump(exclude_none=True)

    models, streamed = served.stream("gamma", max_tokens=10)
    assert models == {"gamma@v1.0.0"} and streamed == served.complete("gamma", max_tokens=10)[1]


def test_stop_strings_end_the_text_before_them(served: Served) -> None:
    _, text = served.complete("delta", max_tokens=24)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    response = served.client.completions.create(
        model="delta", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "never-there"]
    )
    assert response.choices[0].text == text[:cut]
    assert response.choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_repeatable(served: Served) -> None:
    def sample(seed: int) -> str:
        return served.complete("beta", max_tokens=16, temperature=1.0, seed=seed)[1]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_many_concurrent_streams_on_different_adapters_each_get_their_own_answer(served: Served) -> None:
    models = ["alpha@v1.0.0", "beta", "gamma", "delta"]
    alone = {model: served.complete(model, max_tokens=16)[1] for model in models}
    assert len(set(alone.values())) == len(models)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: (models[i % 4], served.stream(models[i % 4], max_tokens=16)), range(12)))
    for model, (versions, text) in results:
        assert len(versions) == 1 and text == alone[model], model


def test_promote_and_rollback_reach_a_running_server_and_requests_finish_on_the_version_they_started_with(
    served: Served, cli: Any
) -> None:
    v1, v2 = "swap@v1.0.0", "swap@v1.1.0"
    expected = {v: served.complete(v)[1] for v in (v1, v2)}  # both loaded now: queuing a request needs no worker
    assert expected[v1] != expected[v2]
    engine = served.engine

    def visible(version: str) -> None:
        """Wait until the bare name means VERSION to the running server (its catalog follows the registry)."""
        wait_for(
            lambda: served.client.models.retrieve("swap").model_extra["version"] == version, 30, f"swap -> {version}"
        )

    def queued(count: int) -> None:
        wait_for(lambda: engine.status().waiting == count, 30, f"{count} streams to wait in the held engine")

    assert cli("promote", v1, "--stage", "prod", cwd=served.registry.root).exit_code == 0
    visible(v1)
    with ThreadPoolExecutor(5) as pool:
        for command, old, new in ((["promote", v2], v1, v2), (["rollback", "swap"], v2, v1)):
            # A fault point: the engine holds at a step boundary while four streams wait in it, resolved before the
            # change; the change reaches the server; a fifth stream comes after it; then the engine goes on.
            with engine.paused():
                before = [pool.submit(served.stream, model) for model in ("swap", "swap", "swap", v1)]
                queued(4)
                result = cli(*command, "--stage", "prod", cwd=served.registry.root)
                assert result.exit_code == 0, result.output
                visible(new)
                after = pool.submit(served.stream, "swap")
                queued(5)
            # Each stream answers whole from the one version it started with (v1 when pinned to it).
            assert [f.result() for f in before] == [({old}, expected[old])] * 3 + [({v1}, expected[v1])]
            assert after.result() == ({new}, expected[new])


def test_errors_are_openai_shaped_and_leave_the_server_healthy(served: Served, make_adapter: Any) -> None:
    pickled = served.registry.state().resolve("pickled")
    planted = served.catalog.folder(pickled)  # as if the cache held a pickle beside the weights
    shutil.copytree(make_adapter(1), planted)
    (planted / "adapter_model.bin").write_bytes(b"not loaded, ever")
    engine = served.engine
    long_prompt = "fox " * engine.context_length
    cases = [
        ({"model": "nope", "prompt": "x"}, 404, "model_not_found", "'nope' does not exist"),
        ({"model": "alpha@v9.0.0", "prompt": "x"}, 404, "model_not_found", "alpha@v9.0.0 is not registered"),
        ({"model": "alpha#staging", "prompt": "x"}, 404, "model_not_found", "holds stage 'staging'"),
        ({"model": "Not A Name!", "prompt": "x"}, 404, "model_not_found", "does not exist"),
        (
            {"model": "foreign", "prompt": "x"},
            422,
            "adapter_rejected",
            f"sha256:{'e' * 64}, this server runs {engine.fingerprint}",
        ),
        ({"model": "wide", "prompt": "x"}, 422, "adapter_rejected", "rank 128, above this server's maximum of 64"),
        (
            {"model": "pickled", "prompt": "x"},
            422,
            "adapter_rejected",
            "adapter_model.bin: pickle-based weights are refused",
        ),
        ({"model": "alpha", "prompt": long_prompt}, 400, None, f"context holds {engine.context_length} tokens"),
        (
            {"model": "alpha", "prompt": "x", "max_tokens": 300},
            400,
            None,
            "above this server's cap (--max-tokens-cap) of 256",
        ),
        ({"model": "alpha", "prompt": "x", "temperature": 3}, 400, None, "temperature: Input should be less than"),
        ({"prompt": "x"}, 400, None, "model: Field required"),
        ({"model": "alpha", "prompt": "x", "n": 17}, 400, None, "n: Input should be less than or equal to 16"),
        ({"model": "alpha", "prompt": "x", "temprature": 0}, 400, None, "temprature: Extra inputs are not permitted"),
    ]
    for body, status, code, message in cases:
        response = httpx.post(f"{served.url}/v1/completions", json=body, timeout=30)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == code and message in error["message"], (body, error)
        assert served.complete("alpha", max_tokens=2)[1]  # healthy after each
    bad_json = httpx.post(
        f"{served.url}/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    as_form = httpx.post(f"{served.url}/v1/completions", content=b'{"model": "alpha", "prompt": "x"}')
    assert as_form.status_code == 400 and "Content-Type: application/json" in as_form.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.UnprocessableEntityError):
        served.client.chat.completions.create(model="wide", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        served.client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=10_000)
    assert served.complete("alpha", max_tokens=2)[1]


def test_models_lists_base_and_adapters_and_docs_are_served(served: Served) -> None:
    listed = {model.id: model for model in served.client.models.list()}
    assert {"tiny-llama", "alpha", "beta", "gamma", "delta", "swap"} <= set(listed)
    assert listed["alpha"].model_extra["version"] == "alpha@v1.1.0"  # no prod stage: the latest
    assert listed["alpha"].model_extra["parent"] == "tiny-llama"
    assert httpx.get(f"{served.url}/docs").status_code == 200
    assert "/v1/chat/completions" in httpx.get(f"{served.url}/openapi.json").json()["paths"]


def test_metrics_move_and_each_request_writes_one_log_line(
    served: Served, make_adapter: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="serve")
    url = served.url
    ok = {"endpoint": "/v1/completions", "status": "200"}
    requests, tokens = (
        metric(url, "adapters_requests_total", **ok),
        metric(url, "adapters_tokens_total", kind="completion"),
    )
    first_tokens = metric(url, "adapters_time_to_first_token_seconds_count")
    single_row_passes = metric(url, "adapters_batch_size_bucket", le="1.0")  # a histogram's own bucket names
    response = served.client.completions.with_raw_response.create(
        model="delta", prompt=PROMPT, max_tokens=5, temperature=0
    )
    completion = response.parse()
    # Alone in the engine: one pass of one row per token (the prompt's pass gives the first).
    assert metric(url, "adapters_batch_size_bucket", le="1.0") == single_row_passes + completion.usage.completion_tokens
    loads = metric(url, "adapters_adapter_loads_total")  # after delta's own load, whichever test ran first
    assert metric(url, "adapters_requests_total", **ok) == requests + 1
    assert metric(url, "adapters_tokens_total", kind="completion") == tokens + completion.usage.completion_tokens
    assert metric(url, "adapters_time_to_first_token_seconds_count") == first_tokens + 1
    assert metric(url, "adapters_running_requests") == 0
    served.registry.add("fresh", make_adapter(8))
    assert httpx.post(f"{url}/admin/refresh").json()["adapters"]["fresh"] == "fresh@v1.0.0"
    loaded = httpx.post(f"{url}/admin/load", json={"model": "fresh"}).json()
    assert loaded["model"] == "fresh@v1.0.0" and loaded["loaded"] is True
    assert metric(url, "adapters_adapter_loads_total") == loads + 1

    request_id = response.headers["x-request-id"]
    line = wait_for(lambda: [r.getMessage() for r in caplog.records if request_id in r.getMessage()], 5, "the log line")
    assert len(line) == 1
    for part in (
        "POST /v1/completions",
        "tenant=open",
        "model=delta@v1.0.0",
        "status=200",
        "completion_tokens=",
        "seconds=",
    ):
        assert part in line[0]


def test_catalog_fetches_a_missing_version_from_the_remote_once_under_concurrent_requests(
    registry: Registry, make_adapter: Any, tmp_path: Path, tiny_base: Path
) -> None:
    from adapterctl.core.base import fingerprint

    registry.add("remote", make_adapter(1))
    registry.add("remote", make_adapter(2))
    push(registry, [])
    server_side, _ = clone(str(tmp_path / "origin.git"), tmp_path / "server", [])  # holds v1.1.0's files only
    catalog = Catalog(server_side, tmp_path / "cache", base_id="base", fingerprint=fingerprint(tiny_base), max_rank=64)

    def resolve(_: int) -> Any:
        return asyncio.run(catalog.resolve("remote@v1.0.0", lambda name: True))

    with ThreadPoolExecutor(6) as pool:
        specs = list(pool.map(resolve, range(6)))
    assert {spec.key for spec in specs} == {"remote@v1.0.0"} and len({spec.path for spec in specs}) == 1
    assert sha_tree(specs[0].path) == sha_tree(make_adapter(1))
    assert [p.name for p in (tmp_path / "cache" / "remote").iterdir()] == [specs[0].path.name]  # no staging left
