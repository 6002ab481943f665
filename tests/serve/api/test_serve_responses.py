"""OpenAI's Responses API over real HTTP with the official client: text or items in, whole or streamed (OpenAI's
event types), usage, instructions, max_output_tokens, text.format json_schema, function tools; stateless."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from engines import VLLM
from serving import serving_alpha

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "name": "get_weather", "description": "Forecast.", "parameters": WEATHER}


@pytest.fixture(scope="module", params=["transformers", VLLM])
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, make_adapter: Any
) -> Iterator[openai.OpenAI]:
    """The same server on each engine."""
    with serving_alpha(request, tmp_path_factory.mktemp("responses"), tiny_base, make_adapter(1)) as server:
        yield server.client


def test_a_response_is_the_chat_answer_whole_and_streamed(client: openai.OpenAI) -> None:
    settings = {"model": "alpha", "max_output_tokens": 6, "temperature": 0}
    chat = client.chat.completions.create(
        model="alpha",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
    )
    whole = client.responses.create(input="Hi", instructions="Be brief.", store=True, **settings)
    assert whole.object == "response" and whole.id.startswith("resp_") and whole.model == "alpha@v1.0.0"
    assert whole.output_text == chat.choices[0].message.content
    assert whole.usage.input_tokens == chat.usage.prompt_tokens
    assert whole.usage.output_tokens == chat.usage.completion_tokens
    cut = chat.choices[0].finish_reason == "length"
    assert whole.status == ("incomplete" if cut else "completed")
    assert (whole.incomplete_details.reason if cut else whole.incomplete_details) == (
        "max_output_tokens" if cut else None
    )
    assert whole.store is False  # answered, not kept: this server is stateless

    events = list(client.responses.create(input="Hi", instructions="Be brief.", stream=True, **settings))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_items_and_a_json_schema_format(client: openai.OpenAI) -> None:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Name someone."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Ann."}]},
        {"role": "user", "content": "As JSON."},
    ]
    text = {"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}}
    answer = client.responses.create(model="alpha", input=items, text=text, max_output_tokens=60, temperature=0)
    assert answer.status == "completed"
    jsonschema.validate(json.loads(answer.output_text), SCHEMA)


def test_function_tools_give_function_call_items_whole_and_streamed(client: openai.OpenAI) -> None:
    body = {"model": "alpha", "input": "Weather in Oslo?", "tools": [TOOL], "max_output_tokens": 60, "temperature": 0}
    whole = client.responses.create(**body, tool_choice="required")
    (call,) = [item for item in whole.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)

    events = list(client.responses.create(**body, tool_choice={"type": "function", "name": "get_weather"}, stream=True))
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    # Greedy: the same call (a named function's arguments are its text as written, "required" ones re-encoded).
    assert done.name == "get_weather" and json.loads(done.arguments) == json.loads(call.arguments)
    assert events[-1].type == "response.completed" and events[-1].response.output[-1].arguments == done.arguments

    answered = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"},
    ]
    assert client.responses.create(model="alpha", input=answered, tools=[TOOL], max_output_tokens=3).output


def test_nothing_is_kept_so_a_previous_response_is_refused(client: openai.OpenAI) -> None:
    url = str(client.base_url).rstrip("/")
    body = {"model": "alpha", "input": "Hi", "previous_response_id": "resp_1"}
    response = httpx.post(f"{url}/responses", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "previous_response_id"


def test_langchain_on_the_responses_api_answers_and_streams(client: openai.OpenAI) -> None:
    """LangChain's `ChatOpenAI(use_responses_api=True)`: the same text whole and streamed, and usage."""
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=str(client.base_url), api_key="unused", model="alpha", temperature=0, max_tokens=6,
        use_responses_api=True, max_retries=0,
    )  # fmt: skip
    whole = chat.invoke("Hi")
    expected = client.responses.create(model="alpha", input="Hi", max_output_tokens=6, temperature=0).output_text
    assert whole.text == expected and whole.usage_metadata["output_tokens"] >= 1
    streamed = "".join(piece.text for piece in chat.stream("Hi"))
    assert streamed == expected
