"""response_format's JSON schema: compiled once per request, off the event loop and the batch loop, and refused
(400) on both engines when llguidance could not follow it, never answered with a cut JSON and "stop"."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import llguidance
import llguidance.hf
import pytest
from engines import VLLM
from serving import registry_with, serving

from adapterctl.serve.engines.base import InvalidRequest, Sampling
from adapterctl.serve.engines.grammar import MAX_SCHEMA_CHARACTERS
from adapterctl.serve.engines.transformers.engine import TransformersEngine

UNFOLLOWABLE = {
    "recursive $ref": {"$ref": "#"},  # llguidance answered "" and "stop"
    "nested repeats": {"type": "string", "pattern": "^((a{100}){100}){100}$"},  # it answered '{"' and "stop"
}
ENUM = {"enum": [f"value-{i}" for i in range(20000)]}


@pytest.fixture(scope="module")
def engine(tiny_base: Path) -> Iterator[TransformersEngine]:
    built = TransformersEngine(tiny_base, model_id="tiny-llama", quantize="none", max_batch=8)
    yield built
    asyncio.run(built.close())


def prepared(engine: Any, schema: str) -> list[Sampling]:
    return asyncio.run(engine.prepare([Sampling(max_tokens=20, json_schema=schema)]))


def test_the_token_table_is_built_when_the_engine_starts(engine, monkeypatch):
    assert isinstance(engine._grammars.tokens, llguidance.LLTokenizer)  # before any request

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the token table was built for a request")

    monkeypatch.setattr(llguidance.hf, "from_tokenizer", never)
    (sampling,) = prepared(engine, json.dumps({"type": "object"}))
    assert isinstance(sampling.grammar, llguidance.LLMatcher)


@pytest.mark.parametrize("kind", ["transformers", VLLM])
@pytest.mark.parametrize("schema", list(UNFOLLOWABLE.values()), ids=list(UNFOLLOWABLE))
def test_a_schema_llguidance_cannot_follow_is_refused_on_both_engines(kind, schema, request):
    served = request.getfixturevalue("engine" if kind == "transformers" else "vllm_engine")
    with pytest.raises(InvalidRequest, match="response_format holds a JSON schema that cannot be used") as refused:
        prepared(served, json.dumps(schema))
    assert refused.value.param == "response_format"


def test_a_schema_over_the_size_bound_is_refused_before_it_is_compiled(engine):
    huge = json.dumps({"enum": ["x" * 1000] * (MAX_SCHEMA_CHARACTERS // 1000)})
    with pytest.raises(InvalidRequest, match=f"over this server's {MAX_SCHEMA_CHARACTERS}"):
        prepared(engine, huge)


def test_a_large_schema_compiles_once_off_the_event_loop_while_healthz_answers(tiny_base, tmp_path, monkeypatch):
    # An engine of its own: the server closes its engine when it stops, and the module's serves the tests after this.
    engine = TransformersEngine(tiny_base, model_id="tiny-llama", quantize="none", max_batch=8)
    grammars, entered, release, compiles = engine._grammars, threading.Event(), threading.Event(), []
    compile_schema = grammars.compile

    def held(schema: str) -> llguidance.LLMatcher:  # the fault point: the compile waits until the test lets it go
        compiles.append(schema)
        entered.set()
        assert release.wait(60)
        return compile_schema(schema)

    monkeypatch.setattr(grammars, "compile", held)
    registry = registry_with(tmp_path / "registry", {})
    response_format = {"type": "json_schema", "json_schema": {"name": "big", "schema": ENUM}}
    body = {"model": "tiny-llama", "prompt": ["a", "b"], "n": 3, "max_tokens": 30, "response_format": response_format}
    with serving(engine, registry, tiny_base) as server, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{server.url}/v1/completions", json=body, timeout=120)
        assert entered.wait(60)
        # The compile is held: only an event loop left free answers.
        health = httpx.get(f"{server.url}/healthz", timeout=30)
        release.set()
        response = answer.result()
    assert health.status_code == 200
    assert response.status_code == 200, response.text
    assert len(compiles) == 1  # six generations, one compile
    for choice in response.json()["choices"]:
        assert choice["finish_reason"] == "stop" and json.loads(choice["text"]) in ENUM["enum"]


def test_a_schema_llguidance_gives_up_on_while_generating_fails_the_request_never_stops_it(engine):
    from engines import chunks, request

    from adapterctl.serve.engines.base import GenerationFailed

    grammars = engine._grammars  # past the compile's walk: the matcher as it was before the check refused it
    schema = json.dumps(UNFOLLOWABLE["nested repeats"])
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    unchecked = llguidance.LLMatcher(grammars.tokens, grammar, log_level=0)
    sampling = Sampling(max_tokens=20, temperature=0, json_schema=schema, grammar=unchecked)
    with pytest.raises(GenerationFailed, match="could not follow response_format's JSON schema"):
        asyncio.run(chunks(engine, request(engine, "Hello", sampling=sampling)))
