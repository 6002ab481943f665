"""Tenants and operators: API keys, per-tenant adapters and limits (generations at once, tokens per minute),
admin endpoints, metrics kept from tenants, eviction; and the `adapters serve` / `adapters tenants` commands:
refused options, keys shown once, SIGTERM drains."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from serving import events, metric, openai_client, registry_with, server_process, serving, tenants_cli, wait_for

from adapterctl.registry.repo import Registry

PROMPT = "Once upon a time"


def _key(cli: Any, *args: str, cwd: Path) -> str:
    """Run `adapters tenants ARGS`; the key is the one line on stdout."""
    result = cli("tenants", *args, cwd=cwd)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


class Clock:
    """Seconds that pass only when a test moves them on: the token-rate limit's window, without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Hosted:
    """A tenants-mode server that polls nothing (refresh is explicit) and keeps two adapters loaded at most."""

    url: str
    registry: Registry
    tenants_file: Path
    keys: dict[str, str]
    engine: Any
    clock: Clock

    def client(self, who: str) -> openai.OpenAI:
        return openai_client(self.url, self.keys[who])

    def post(self, path: str, who: str | None, **body: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=60)

    def get(self, path: str, who: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=60)


@pytest.fixture(scope="module")
def hosted(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, make_adapter: Any) -> Iterator[Hosted]:
    from fake_engine import FakeEngine

    from adapterctl.core.base import fingerprint
    from adapterctl.serve.api.tenants import Limiter

    root = tmp_path_factory.mktemp("hosted")
    adapters = {"acme-a": [1], "acme-b": [2, 6], "acme-c": [3], "globex-a": [4], "globex-b": [5]}
    registry = registry_with(root / "registry", {n: [make_adapter(s) for s in seeds] for n, seeds in adapters.items()})
    tenants_file = root / "tenants.yaml"

    key = partial(tenants_cli, tenants_file)

    keys = {
        "acme": key("add", "acme", "--adapters", "acme-*", "--max-concurrent", "1", "--max-tokens", "400"),
        "globex": key("add", "globex", "--adapters", "globex-*"),
        "hooli": key("add", "hooli", "--adapters", "hooli-*", "--max-concurrent", "4"),
        "umbrella": key("add", "umbrella", "--adapters", "umbrella-*", "--max-tokens-per-minute", "100"),
        "admin": key("admin"),
        "metrics": key("metrics"),
        "wrong": "sk-adapters-not-a-key",
    }
    # Keys, rights and limits are the HTTP layer's: the fake engine serves these tests (the adapters are real).
    engine = FakeEngine(model_id="tiny-llama", fingerprint=fingerprint(tiny_base), max_loaded=2, max_batch=16)
    options = {"tenants": tenants_file, "settings": {"max_tokens_cap": 900}}
    with serving(engine, registry, tiny_base, interval=3600, **options) as server:  # refreshed by POST only
        clock = Clock()
        server.app.state.server.limiter = Limiter(clock)  # before any request: the token-rate window on a clock
        yield Hosted(server.url, registry, tenants_file, keys, engine, clock)


def test_tenants_file_keeps_only_hashes_and_keys_are_shown_once(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    options = ["--adapters", "acme-*,shared", "--max-tokens", "64", "--weight", "2", "--file", str(path)]
    key = _key(cli, "add", "acme", *options, cwd=tmp_path)
    admin = _key(cli, "admin", "--file", str(path), cwd=tmp_path)
    text = path.read_text()
    assert key.startswith("sk-adapters-") and key not in text and admin not in text
    data = yaml.safe_load(text)
    assert data["tenants"]["acme"]["adapters"] == ["acme-*", "shared"] and data["tenants"]["acme"]["max_tokens"] == 64
    assert data["tenants"]["acme"]["weight"] == 2
    again = cli("tenants", "add", "acme", "--adapters", "x", "--file", str(path), cwd=tmp_path)
    assert again.exit_code == 2 and "already in" in again.stderr and "Traceback" not in again.output


def test_each_tenant_sees_and_uses_only_its_own_adapters(hosted: Hosted) -> None:
    assert [m.id for m in hosted.client("acme").models.list()] == ["tiny-llama", "acme-a", "acme-b", "acme-c"]
    assert [m.id for m in hosted.client("globex").models.list()] == ["tiny-llama", "globex-a", "globex-b"]
    assert len(hosted.client("admin").models.list().data) == 6
    answer = hosted.client("globex").completions.create(model="globex-a", prompt=PROMPT, max_tokens=4)
    assert answer.model == "globex-a@v1.0.0"
    for model in ("globex-a", "globex-a@v1.0.0", "globex-a#prod", "globex-a@latest"):
        foreign = hosted.post("/v1/completions", "acme", model=model, prompt=PROMPT).json()
        absent = hosted.post(
            "/v1/completions", "acme", model=model.replace("globex-a", "acme-zz"), prompt=PROMPT
        ).json()
        assert foreign["error"]["message"] == absent["error"]["message"].replace("acme-zz", "globex-a")
        assert foreign["error"]["code"] == absent["error"]["code"] == "model_not_found"
    assert hosted.get("/v1/models/globex-a", "acme").status_code == 404


def test_missing_or_wrong_keys_are_401_and_tenant_keys_cannot_administer(hosted: Hosted) -> None:
    for who in (None, "wrong"):
        response = hosted.post(
            "/v1/chat/completions", who, model="acme-a", messages=[{"role": "user", "content": "hi"}]
        )
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert hosted.get("/admin/loaded", who).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai_client(hosted.url, "sk-nope").models.list()
    for who in ("acme", "globex"):
        denied = hosted.post("/admin/refresh", who)
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    assert hosted.get("/admin/loaded", "admin").status_code == 200
    assert hosted.get("/healthz", None).status_code == 200 and hosted.get("/readyz", None).status_code == 200


def test_a_tenant_over_its_concurrency_gets_429_until_its_request_ends(hosted: Hosted) -> None:
    headers = {"Authorization": f"Bearer {hosted.keys['acme']}"}
    body = {"model": "acme-a", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{hosted.url}/v1/completions", json=body, headers=headers, timeout=60) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: dropping the iterator would hang up
        assert next(lines).startswith("data: ")  # generating now
        refused = hosted.post("/v1/completions", "acme", model="acme-b", prompt=PROMPT, max_tokens=2)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        other = hosted.post("/v1/completions", "globex", model="globex-b", prompt=PROMPT, max_tokens=2)
        assert other.status_code == 200  # limits are per tenant
    # The client hung up mid-stream: its slot comes back.
    wait_for(
        lambda: hosted.post("/v1/completions", "acme", model="acme-b", prompt=PROMPT, max_tokens=2).status_code == 200,
        10,
        "acme's slot to be given back",
    )


def test_a_client_that_hangs_up_on_a_whole_answer_stops_its_generation(
    hosted: Hosted, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="serve")
    headers = {"Authorization": f"Bearer {hosted.keys['acme']}"}
    body = {"model": "acme-c", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}
    engine, generated = hosted.engine, hosted.engine.tokens
    with engine.paused():  # a fault point: no step runs, so the answer cannot come before the client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{hosted.url}/v1/completions", json=body, headers=headers, timeout=httpx.Timeout(30, read=0.5))
        lines = wait_for(lambda: [r.getMessage() for r in caplog.records if "status=499" in r.getMessage()], 10, "499")
    assert "tenant=acme model=acme-c@v1.0.0" in lines[0]
    assert int(lines[0].split("completion_tokens=")[1].split()[0]) < 400  # stopped, not run to the end
    assert hosted.post("/v1/completions", "acme", model="acme-c", prompt=PROMPT, max_tokens=2).status_code == 200
    assert engine.tokens == generated + 2  # the hung-up generation left the engine without a step of its own


def test_a_tenant_cannot_ask_for_more_tokens_than_its_limit(hosted: Hosted) -> None:
    refused = hosted.post("/v1/completions", "acme", model="acme-a", prompt=PROMPT, max_tokens=401)
    assert refused.status_code == 400 and "the limit of tenant 'acme' of 400" in refused.json()["error"]["message"]


def test_a_prompt_list_holds_at_most_2048_prompts(hosted: Hosted) -> None:
    accepted = hosted.post("/v1/completions", "globex", model="tiny-llama", prompt=["a"] * 2048, max_tokens=1)
    assert accepted.status_code == 200 and len(accepted.json()["choices"]) == 2048
    refused = hosted.post("/v1/completions", "globex", model="tiny-llama", prompt=["a"] * 2049, max_tokens=1)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "prompt"
    assert error["message"].startswith("prompt is a list of 2049 prompts; this server takes at most 2048")


def test_max_concurrent_counts_generations_not_requests(hosted: Hosted) -> None:
    def complete(prompt: str | list[str], **body: Any) -> httpx.Response:
        return hosted.post("/v1/completions", "hooli", model="tiny-llama", prompt=prompt, max_tokens=2, **body)

    # hooli may run 4 generations at once: 3 prompts x n=2 can never run, so it is a 400, not a 429 to retry.
    too_many = complete([PROMPT] * 3, n=2).json()["error"]
    assert too_many["type"] == "invalid_request_error" and too_many["param"] == "prompt"
    assert "6 generations (3 prompts x 2 choices" in too_many["message"]
    assert "the 4 tenant 'hooli' may run at once (max_concurrent)" in too_many["message"]
    assert complete(PROMPT, best_of=5).status_code == 400

    # A fault point: the engine holds at a step boundary, so the streams' generations run as long as the test needs.
    headers = {"Authorization": f"Bearer {hosted.keys['hooli']}"}
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4, "stream": True}

    def stream(n: int) -> Any:
        return httpx.stream("POST", f"{hosted.url}/v1/completions", json={**body, "n": n}, headers=headers, timeout=60)

    with contextlib.ExitStack() as streams:
        with hosted.engine.paused():
            running = streams.enter_context(stream(3))
            assert running.status_code == 200  # admitted: its 3 generations count from now
            over = complete(PROMPT, n=2)
            assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limit_error"
            assert "runs 3 of its 4 generations at once" in over.json()["error"]["message"]
            fits = streams.enter_context(stream(1))
            assert fits.status_code == 200  # 3 + 1 fit
        assert events(running)[-1] == events(fits)[-1] == "[DONE]"
    wait_for(lambda: complete([PROMPT] * 2, n=2).status_code == 200, 10, "hooli's generations to be given back")


def test_tokens_per_minute_are_reserved_settled_and_freed_a_minute_later(hosted: Hosted) -> None:
    def complete(**body: Any) -> httpx.Response:
        return hosted.post("/v1/completions", "umbrella", model="tiny-llama", prompt=PROMPT, **body)

    start = hosted.clock.now
    # 16 prompt tokens + 90: more than umbrella's 100 a minute, ever.
    alone = complete(max_tokens=90)
    assert alone.status_code == 400 and alone.json()["error"]["param"] == "max_tokens"
    assert "over the 100 per minute of tenant 'umbrella' (max_tokens_per_minute)" in alone.json()["error"]["message"]
    # Reserved 16 + 60, settled to what ran: the first token is a stop token.
    early = complete(max_tokens=60, stop_token_ids=list(range(256)))
    assert early.status_code == 200 and early.json()["usage"]["total_tokens"] == 17
    hosted.clock.now = start + 5
    full = complete(max_tokens=60, ignore_eos=True)  # 17 + 76 fit only because the first was settled
    assert full.status_code == 200 and full.json()["usage"]["total_tokens"] == 76

    hosted.clock.now = start + 10
    small = complete(max_tokens=1)  # 93 + 17: 10 must free, the first request's 17 will, at start + 60
    assert small.status_code == 429 and small.headers["Retry-After"] == "50"
    larger = complete(max_tokens=20)  # 93 + 36: 29 must free, the second's 76 too, at start + 65
    assert larger.status_code == 429 and larger.headers["Retry-After"] == "55"
    assert larger.json()["error"]["type"] == "rate_limit_error" and "retry in 55 s" in larger.json()["error"]["message"]
    hosted.clock.now = start + 60
    assert complete(max_tokens=20).headers["Retry-After"] == "5"
    hosted.clock.now = start + 65
    assert complete(max_tokens=20).status_code == 200


def test_echo_with_logprobs_is_bounded(hosted: Hosted) -> None:
    ok = hosted.post(
        "/v1/completions", "globex", model="tiny-llama", prompt=PROMPT, echo=True, logprobs=1, max_tokens=1
    )
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["tokens"]) == len(PROMPT) + 1
    # 4 prompts of 500 tokens x 16 generations x 21 log-probabilities each: 672,000, over the 262,144 bound.
    big = hosted.post(
        "/v1/completions",
        "globex",
        model="tiny-llama",
        prompt=["a" * 500] * 4,
        n=16,
        echo=True,
        logprobs=20,
        max_tokens=1,
    )
    assert big.status_code == 400 and big.json()["error"]["param"] == "logprobs"
    assert "returns 672000 prompt log-probabilities" in big.json()["error"]["message"]


def test_metrics_need_the_admin_or_the_metrics_key_with_tenants(hosted: Hosted) -> None:
    for who in (None, "wrong", "acme"):
        refused = hosted.get("/metrics", who)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error", who
    assert "send the admin key or the metrics key" in hosted.get("/metrics", "acme").json()["error"]["message"]
    for who in ("admin", "metrics"):
        scraped = hosted.get("/metrics", who)
        assert scraped.status_code == 200 and "adapters_requests_total" in scraped.text
    assert hosted.get("/v1/models", "metrics").status_code == 403  # the metrics key reads /metrics only


def test_metrics_stay_open_without_tenants(hosted: Hosted, tiny_base: Path) -> None:
    from fake_engine import FakeEngine

    with serving(FakeEngine(model_id="tiny-llama"), hosted.registry, tiny_base) as server:
        assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_a_tenant_added_while_the_server_runs_can_call_at_once(hosted: Hosted, cli: Any) -> None:
    hosted.keys["initech"] = _key(
        cli,
        "add",
        "initech",
        "--adapters",
        "globex-b",
        "--file",
        str(hosted.tenants_file),
        cwd=hosted.tenants_file.parent,
    )
    assert [m.id for m in hosted.client("initech").models.list()] == ["tiny-llama", "globex-b"]


def test_admin_refresh_shows_a_promotion_at_once(hosted: Hosted, cli: Any) -> None:
    assert hosted.client("acme").models.retrieve("acme-b").model_extra["version"] == "acme-b@v1.1.0"
    assert cli("promote", "acme-b@v1.0.0", "--stage", "prod", cwd=hosted.registry.root).exit_code == 0
    assert hosted.client("acme").models.retrieve("acme-b").model_extra["version"] == "acme-b@v1.1.0"  # not polled
    refreshed = hosted.post("/admin/refresh", "admin").json()
    assert refreshed["adapters"]["acme-b"] == "acme-b@v1.0.0"
    answer = hosted.client("acme").completions.create(model="acme-b", prompt=PROMPT, max_tokens=2)
    assert answer.model == "acme-b@v1.0.0"


def test_eviction_keeps_at_most_max_loaded_adapters_and_every_answer_right(hosted: Hosted) -> None:
    admin = hosted.client("admin")
    models = ["acme-a@v1.0.0", "acme-b@v1.1.0", "acme-c@v1.0.0", "globex-a@v1.0.0", "globex-b@v1.0.0"]

    def answer(model: str) -> str:
        return admin.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text

    evictions = metric(hosted.url, "adapters_adapter_evictions_total", key=hosted.keys["admin"])
    alone = {model: answer(model) for model in models}
    assert len(set(alone.values())) == len(models)
    most, done = 0, threading.Event()

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, len(hosted.get("/admin/loaded", "admin").json()["loaded"]))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda i: (models[i % 5], answer(models[i % 5])), range(20)))
    finally:
        done.set()
        watcher.join()
    wrong = [(model, text) for model, text in answers if text != alone[model]]
    assert not wrong, f"answered otherwise than alone: {wrong}"
    assert 0 < most <= 2
    assert metric(hosted.url, "adapters_adapter_evictions_total", key=hosted.keys["admin"]) >= evictions + 3


def test_admin_loads_and_unloads_adapters(hosted: Hosted) -> None:
    loaded = hosted.post("/admin/load", "admin", model="globex-b").json()
    assert loaded["model"] == "globex-b@v1.0.0" and "globex-b@v1.0.0" in loaded["adapters"]
    unloaded = hosted.post("/admin/unload", "admin", model="globex-b@v1.0.0").json()
    assert (
        unloaded["unloaded"] is True and "globex-b@v1.0.0" not in hosted.get("/admin/loaded", "admin").json()["loaded"]
    )
    assert hosted.post("/admin/load", "admin", model="nope").status_code == 404
    assert hosted.post("/admin/load", "admin", model="tiny-llama").status_code == 400


def test_a_tenants_file_that_cannot_be_used_refuses_every_key_until_it_is_fixed(
    hosted: Hosted, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="serve")
    path = hosted.tenants_file
    original = path.read_text()
    data = yaml.safe_load(original)
    revoked = yaml.safe_dump({**data, "tenants": {k: v for k, v in data["tenants"].items() if k != "globex"}})
    try:
        # An edit that revokes globex, with a YAML typo: the revocation must not be lost, so no key works.
        path.write_text(revoked + "extra: [unclosed\n")
        for who in ("globex", "acme", "admin"):
            refused = hosted.get("/v1/models", who)
            assert refused.status_code == 503, (who, refused.text)
            assert refused.json()["error"]["message"].startswith("The server cannot use its tenants file")
        ready = hosted.get("/readyz", None)
        reason = ready.json()["error"]["message"]
        assert ready.status_code == 503 and reason.startswith("Every key is refused until the tenants file is fixed")
        assert str(path) not in reason
        path.write_text(revoked)  # fixed: the revocation holds, the others work again
        assert hosted.get("/v1/models", "globex").status_code == 401
        assert hosted.get("/v1/models", "acme").status_code == 200
        assert hosted.get("/readyz", None).status_code == 200
        path.write_text("")  # emptied: every key gone, the admin's too; said loudly, not a silent lock-out
        assert hosted.get("/admin/loaded", "admin").status_code == 503
        assert "holds no keys" in hosted.get("/readyz", None).json()["error"]["message"]
    finally:
        path.write_text(original)
    assert hosted.get("/v1/models", "globex").status_code == 200
    logged = [r.getMessage() for r in caplog.records if "every key is refused until it is fixed" in r.getMessage()]
    assert len(logged) == 2 and "holds no keys" in logged[1]  # once per bad state, not once per request


def test_serve_refuses_bad_options_in_one_line(cli: Any, registry: Registry, tmp_path: Path) -> None:
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("tenants:\n  acme:\n    key_sha256: abc\n    adapters: ['*']\n")
    empty_file = tmp_path / "empty.yaml"
    empty_file.write_text("# every key removed\n")
    taken = socket.create_server(("127.0.0.1", 0))
    cases = [
        (["--host", "0.0.0.0"], "listens on 127.0.0.1 only, not 0.0.0.0"),
        (["--tenants", str(tmp_path / "none.yaml")], "No tenants file at"),
        (["--tenants", str(bad_file), "--host", "0.0.0.0"], "the key hash must be 64 lowercase hex digits"),
        (["--port", str(taken.getsockname()[1])], "Cannot listen on 127.0.0.1"),
        (["--tenants", str(empty_file)], "holds no keys, so every request would be refused"),
    ]
    for args, message in cases:
        result = cli("serve", "--registry", str(registry.root), *args, cwd=tmp_path)
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output
    outside = cli("serve", cwd=tmp_path)
    assert outside.exit_code == 5 and "not inside an adapter repository" in outside.stderr
    taken.close()


def test_serve_refuses_an_option_of_the_other_engine_in_one_line_before_loading_a_model(
    cli: Any, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterctl.serve.engines import factory

    built: list[Any] = []  # a fault point: building an engine is where a model would load
    monkeypatch.setattr(factory, "build", lambda *args: built.append(args))
    cases = [
        (["--dtype", "float32"], "--dtype is an option of the vLLM engine; add --engine vllm or drop it."),
        (["--max-cpu-loras", "16"], "--max-cpu-loras is an option of the vLLM engine; add --engine vllm or drop it."),
        (["--engine", "vllm", "--quantize", "int8"], "The vLLM engine cannot serve a --quantize int8 base"),
        (
            ["--engine", "vllm", "--quantize", "none", "--prefill-chunk", "64"],
            "--prefill-chunk is an option of the transformers engine; drop it with --engine vllm.",
        ),
        (
            ["--engine", "vllm", "--quantize", "none", "--max-cpu-loras", "4"],
            "--max-cpu-loras (4) must be at least --max-loaded (8).",
        ),
        (
            ["--max-batch", "32", "--max-batched-tokens", "32"],
            "--max-batched-tokens (32) must be above --max-batch (32): a step's pass holds every running stream's",
        ),
    ]
    for args, message in cases:
        for where in (["--registry", str(registry.root)], []):  # outside a repository too: the option is at fault
            result = cli("serve", *where, *args, cwd=tmp_path)
            assert result.exit_code == 2, (args, result.output)
            errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
            assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output
    assert built == []


def test_sigterm_lets_a_running_stream_finish_then_exits_0(
    registry: Registry, make_adapter: Any, tiny_base: Path, tmp_path: Path
) -> None:
    registry.add("drain", make_adapter(1))
    args = ["serve", "--base", str(tiny_base), "--port", "0"]  # the default quantization: NF4, bitsandbytes runs here
    with server_process(["-m", "adapterctl.cli", *args], registry.root) as (server, url, lines):
        assert "open mode" in next(line for line in lines if " at http://" in line)
        assert "(quantize nf4)" in "".join(lines)
        body = {"model": "drain", "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines_iter = response.iter_lines()
            first = next(line for line in lines_iter if line.startswith("data: "))
            server.send_signal(signal.SIGTERM)
            rest = list(lines_iter)
        data = [first, *[line for line in rest if line.startswith("data: ")]]
        assert data[-1] == "data: [DONE]" and '"finish_reason":"length"' in data[-2]
        assert server.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
    log = "".join(lines)
    assert "Draining: 1 requests running" in log  # the stream was still running when the signal came
    assert "model=drain@v1.0.0 status=200" in log and "completion_tokens=300" in log


# The batch loop stalls after each step while a row is running and the file argv[1] exists: a stream is held
# mid-way for as long as a test needs, whatever the machine's speed.
_HELD = """
import pathlib, sys, time
from adapterctl.serve.engines.transformers.engine import TransformersEngine
hold, step = pathlib.Path(sys.argv[1]), TransformersEngine._step
def held(self, *args):
    step(self, *args)
    while self._runner.rows and hold.exists():
        time.sleep(0.01)
TransformersEngine._step = held
from adapterctl.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("stop", ["drain time", "second signal"])
def test_requests_cut_at_shutdown_get_an_error_event_and_the_exit_code_says_so(
    stop: str, registry: Registry, make_adapter: Any, tiny_base: Path, tmp_path: Path
) -> None:
    registry.add("drain", make_adapter(1))
    registry.git.run("tag", "-a", "drain@v01.0.0", "-m", "malformed: ignored, not a reason to refuse to start")
    hold = tmp_path / "hold"
    hold.touch()
    drain = "0" if stop == "drain time" else "600"
    args = ["serve", "--base", str(tiny_base), "--quantize", "none", "--port", "0", "--drain-seconds", drain]
    try:
        with server_process(["-c", _HELD, str(hold), *args], registry.root) as (server, url, lines):
            body = {"model": "drain", "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                stream = response.iter_lines()
                assert next(line for line in stream if line.startswith("data: "))  # generating, then held
                server.send_signal(signal.SIGTERM)
                if stop == "second signal":
                    wait_for(lambda: any("Draining: 1 requests running" in line for line in lines), 30, "draining")
                    server.send_signal(signal.SIGTERM)
                rest = [line for line in stream if line.startswith("data: ")]
            hold.unlink()  # the engine may stop now
            assert rest and all("[DONE]" not in line and '"finish_reason":"length"' not in line for line in rest)
            error = json.loads(rest[-1].removeprefix("data: "))["error"]  # cut mid-way, the error event last
            why = "its drain time of 0 s ran out" if stop == "drain time" else "a second stop signal came"
            assert error["message"] == f"The server stopped before this request finished: {why}."
            assert server.wait(60) == 11
    finally:
        hold.unlink(missing_ok=True)
    log = "".join(lines)
    assert "Ignoring the tag 'drain@v01.0.0'" in log
    assert "Error: Stopped with 1 requests cut before they finished" in log


@dataclass
class Shared:
    """A tenants-mode server whose engine runs 2 generations at once: ann (weight 2) and bob share it."""

    url: str
    keys: dict[str, str]
    engine: Any
    fairness: Any
    arrived: list[str]  # the tenant of each generation, in the order it reached the engine
    release: Callable[[], None]  # until called, the engine holds at a step boundary: its rows make no progress

    def send(self, who: str, prompts: int, **body: Any) -> httpx.Response:
        """WHO's list of PROMPTS prompts (each names WHO, all of one length), 4 tokens each."""
        prompt = [f"{who} {i:02d}" for i in range(prompts)]
        headers = {"Authorization": f"Bearer {self.keys[who]}"}
        body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 4, "ignore_eos": True, **body}
        return httpx.post(f"{self.url}/v1/completions", json=body, headers=headers, timeout=60)


@pytest.fixture
def shared(hosted: Hosted, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shared]:
    from fake_engine import FakeEngine

    from adapterctl.serve.api.tenants import add_tenant, set_admin

    path = tmp_path / "tenants.yaml"
    keys = {
        "ann": add_tenant(path, "ann", ["*"], None, None, weight=2),
        "bob": add_tenant(path, "bob", ["*"], None, None),
    }
    set_admin(path)
    engine = FakeEngine(model_id="tiny-llama", max_batch=2)
    # Fault points: which tenant's generation reaches the engine when, and the engine held until a test releases it.
    arrived, generate = [], engine.generate

    async def recording(request: Any) -> Any:
        arrived.append(bytes(request.prompt_ids).decode().split()[0])
        async for chunk in generate(request):
            yield chunk

    monkeypatch.setattr(engine, "generate", recording)
    with serving(engine, hosted.registry, tiny_base, tenants=path) as server, contextlib.ExitStack() as held:
        held.enter_context(engine.paused())
        yield Shared(server.url, keys, engine, server.app.state.server.fairness, arrived, held.close)


def test_a_tenant_alone_uses_every_slot_and_another_gets_the_next_free_one(shared: Shared) -> None:
    with ThreadPoolExecutor(2) as pool:
        flood = pool.submit(shared.send, "ann", 64)
        wait_for(lambda: shared.fairness.waiting("ann") == 62, 10, "ann's list to wait for the engine")
        assert shared.arrived == ["ann", "ann"]  # work-conserving: alone, ann fills both rows of the engine
        one = pool.submit(shared.send, "bob", 1, stream=True)
        wait_for(lambda: shared.fairness.waiting("bob") == 1, 10, "bob's request to wait")
        shared.release()
        assert flood.result().status_code == 200 and one.result().status_code == 200
    # bob's generation went in at the first slot that freed, not after ann's 62 waiting ones.
    assert shared.arrived[:3] == ["ann", "ann", "bob"] and len(shared.arrived) == 65


def test_weights_split_the_engine_between_backlogged_tenants(shared: Shared) -> None:
    with ThreadPoolExecutor(2) as pool:
        ann = pool.submit(shared.send, "ann", 48)
        wait_for(lambda: shared.fairness.waiting("ann") == 46, 10, "ann's list to wait")
        bob = pool.submit(shared.send, "bob", 48)
        wait_for(lambda: shared.fairness.waiting("bob") == 48, 10, "bob's list to wait")
        shared.release()
        assert ann.result().status_code == 200 and bob.result().status_code == 200
    both = shared.arrived[2:50]  # admitted while both lists waited
    assert 29 <= both.count("ann") <= 35, both  # weight 2 to 1: 32 to 16


def test_a_request_whose_client_leaves_while_it_waits_never_reaches_the_engine(shared: Shared) -> None:
    with ThreadPoolExecutor(1) as pool:
        ann = pool.submit(shared.send, "ann", 2)
        wait_for(lambda: shared.arrived == ["ann", "ann"], 10, "ann's generations to fill the engine")
        with pytest.raises(httpx.ReadTimeout):  # a whole answer: the client gives up waiting
            headers = {"Authorization": f"Bearer {shared.keys['bob']}"}
            body = {"model": "tiny-llama", "prompt": ["bob"] * 3, "max_tokens": 4}
            httpx.post(f"{shared.url}/v1/completions", json=body, headers=headers, timeout=httpx.Timeout(30, read=0.5))
        wait_for(lambda: shared.fairness.waiting("bob") == 0, 10, "bob's generations to leave the queue")
        body = {"model": "tiny-llama", "prompt": "bob", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{shared.url}/v1/completions", json=body, headers=headers, timeout=60) as stream:
            assert stream.status_code == 200
            wait_for(lambda: shared.fairness.waiting("bob") == 1, 10, "bob's stream to wait")
        wait_for(lambda: shared.fairness.waiting("bob") == 0, 10, "the stream's generation to leave the queue")
        shared.release()
        assert ann.result().status_code == 200
    assert shared.arrived == ["ann", "ann"]
    wait_for(lambda: shared.fairness.running == 0, 10, "every slot to be free")


def test_a_tenant_weight_must_be_a_positive_number(tmp_path: Path) -> None:
    from adapterctl.serve.api.tenants import TenantsFileError, parse

    for weight in (0, -1, True, "2", float("nan")):
        entry = {"key_sha256": "0" * 64, "adapters": ["*"], "weight": weight}
        with pytest.raises(TenantsFileError, match="`weight` must be a positive number"):
            parse({"tenants": {"acme": entry}}, tmp_path / "tenants.yaml")
    assert parse({"tenants": {"acme": {**entry, "weight": 0.5}}}, tmp_path)["0" * 64].weight == 0.5
