"""Tool calling as vLLM offers it, over real HTTP with the official client on the tiny model: forced calls (a named
function, "required") always parse and match their schema, whole and streamed; tools and calls reach the prompt in
the one format the answer is parsed in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from engines import VLLM
from serving import openai_client, serving_alpha

from adapterctl.core import tool_calls

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
ALARM = {
    "type": "object",
    "properties": {"at": {"type": "string", "enum": ["06:00", "07:00"]}},
    "required": ["at"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "set_alarm", "parameters": ALARM}},
]
CHAT = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
SCHEMAS = {"get_weather": WEATHER, "set_alarm": ALARM}


@pytest.fixture(scope="module", params=["transformers", VLLM])
def url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, make_adapter: Any
) -> Iterator[str]:
    """The same server on each engine: forced calls are their JSON schema, which both engines enforce."""
    with serving_alpha(request, tmp_path_factory.mktemp("tools"), tiny_base, make_adapter(1)) as server:
        yield server.url


def _valid(call: Any, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema or SCHEMAS[call.function.name])
    return arguments


@pytest.mark.parametrize("seed", [0, 1])
def test_a_named_function_is_always_called_with_arguments_matching_its_schema(url: str, seed: int) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    answer = openai_client(url).chat.completions.create(
        model="alpha", messages=CHAT, tools=TOOLS, tool_choice=choice, max_tokens=80, seed=seed, temperature=1.0
    )
    (result,) = answer.choices
    assert result.finish_reason == "stop" and result.message.content is None  # a forced function: "stop", as vLLM
    (call,) = result.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    _valid(call)


def test_required_makes_one_call_of_some_tool_when_parallel_calls_are_off(url: str) -> None:
    answer = openai_client(url).chat.completions.create(
        model="tiny-llama",
        messages=CHAT,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    (result,) = answer.choices
    assert result.finish_reason == "tool_calls"
    (call,) = result.message.tool_calls
    _valid(call)


def test_streamed_deltas_assemble_to_the_same_call(url: str) -> None:
    client = openai_client(url)
    body = {"model": "alpha", "messages": CHAT, "tools": TOOLS, "max_tokens": 80, "temperature": 0}
    choice = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(**body, tool_choice=choice).choices[0].message.tool_calls[0]
    calls: dict[int, dict[str, str]] = {}
    finish, pieces = None, 0
    for chunk in client.chat.completions.create(**body, tool_choice=choice, stream=True):
        pieces += bool(chunk.choices[0].delta.tool_calls)
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            call["name"] += delta_call.function.name or ""
            call["arguments"] += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert calls == {0: {"name": whole.function.name, "arguments": whole.function.arguments}}
    assert finish == "stop" and pieces > 1  # the arguments stream as they are generated


def test_a_conversation_with_calls_and_their_results_is_answered(url: str) -> None:
    history = [
        *CHAT,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C."},
    ]
    answer = openai_client(url).chat.completions.create(
        model="alpha", messages=history, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not one of the tools"),
        ({"tool_choice": "required"}, "needs tools"),
    ],
)
def test_a_call_of_what_is_not_offered_is_a_400(url: str, extra: dict, message: str) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "alpha", "messages": CHAT, **extra}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice", response.text
    assert message in response.json()["error"]["message"]


def test_the_prompt_holds_tools_and_calls_in_the_format_answers_are_parsed_in(tiny_base: Path) -> None:
    """SmolLM2's template has no tools format: the generic one puts the tools in the system turn, earlier calls in
    the assistant's text, results in a user turn; an answer in that format parses back to the same call."""
    from transformers import AutoTokenizer

    from adapterctl.serve.engines.tokenizer import HFTokenizer

    class Tokens(HFTokenizer):
        tokenizer = AutoTokenizer.from_pretrained(tiny_base)
        context_length = 512

    tokens = Tokens()
    assert "tools" not in tokens.tokenizer.chat_template
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    history = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "Sunny"}]
    text = tokens.decode(tokens.encode_chat(history, TOOLS))
    assert tool_calls.tools_text(TOOLS) in text
    written = tool_calls.call_text("get_weather", {"city": "Paris"})
    assert written in text and "<tool_response>\nSunny\n</tool_response>" in text
    assert tool_calls.parse(f"Let me look.\n{written}") == ("Let me look.", [("get_weather", '{"city": "Paris"}')])


def test_auto_answers_parse_into_content_and_calls() -> None:
    from adapterctl.serve.api.tools import ToolUse

    use = ToolUse(tuple(TOOLS), "auto", parallel=False)
    text = 'Sure. <tool_call>\n{"name": "set_alarm", "arguments": {"at": "06:00"}}\n</tool_call>' + (
        '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call> <tool_call>not json</tool_call>'
    )
    message, finish = use.message(text, "stop")
    assert message["content"] == "Sure." and finish == "tool_calls"  # what follows the calls is dropped, as in vLLM
    assert [c["function"] for c in message["tool_calls"]] == [{"name": "set_alarm", "arguments": '{"at": "06:00"}'}]
    assert use.message(text, "length")[1] == "tool_calls"  # it called: cut after its call, still a call, as in vLLM
    cut = "Sure. <tool_call>not json</tool_call> <tool_call>" + '{"name": "set_al'
    assert use.message(cut, "length") == ({"role": "assistant", "content": cut}, "length")
    assert use.message("No call.", "stop") == ({"role": "assistant", "content": "No call."}, "stop")


def test_langchain_structured_output_by_function_calling(url: str) -> None:
    """LangChain's `with_structured_output(method="function_calling")`: a forced call, parsed into its model."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """A forecast request."""

        city: str = Field(max_length=6)
        days: int = Field(ge=1, le=7)

    chat = ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model="alpha", temperature=0, max_tokens=80)
    # strict: closed objects (additionalProperties false), else a random model writes keys until max_tokens.
    structured = chat.with_structured_output(Weather, method="function_calling", strict=True, include_raw=True)
    answer = structured.invoke("Weather in Paris for 3 days?")
    assert isinstance(answer["parsed"], Weather), answer


def test_instructor_default_mode_gets_its_model_from_a_forced_call(url: str) -> None:
    """instructor's default mode (`Mode.TOOLS`): the response model is a named function, and its call parses."""
    import instructor
    from pydantic import BaseModel, ConfigDict, Field

    class Weather(BaseModel):
        """A forecast request."""

        model_config = ConfigDict(extra="forbid")  # a closed object, as LangChain's strict above
        city: str = Field(max_length=6)
        days: int = Field(ge=1, le=7)

    client = instructor.from_openai(openai_client(url))
    assert client.mode is instructor.Mode.TOOLS
    weather, completion = client.chat.completions.create_with_completion(
        model="alpha", messages=CHAT, response_model=Weather, max_tokens=80, temperature=0, max_retries=1
    )
    assert isinstance(weather, Weather)
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "Weather" and _valid(call, Weather.model_json_schema()) == weather.model_dump()
