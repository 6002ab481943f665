"""OpenAI's Responses API (`POST /v1/responses`), stateless: each request is a chat completion underneath, its
answer and stream spelt as Responses. Nothing is stored: `store` is accepted, answered as false, and
`previous_response_id` is refused."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from itertools import count
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapterctl.serve.api.dependencies import CallerDep, ServerDep
from adapterctl.serve.errors import BadRequest
from adapterctl.serve.api.routers.openai import chat_completions
from adapterctl.serve.api.protocol import ChatRequest

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


class ResponsesRequest(BaseModel):
    """POST /v1/responses: what a stateless server can do of it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="An adapter reference or the base model, as in chat completions.")
    input: str | list[dict[str, Any]] = Field(
        description="Text (a user message), or items: messages, function_call and function_call_output."
    )
    instructions: str | None = Field(None, description="A system message before the input.")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stream: bool = False
    text: dict[str, Any] | None = Field(
        None, description='{"format": {"type": "text" | "json_object" | "json_schema"}}'
    )
    tools: list[dict[str, Any]] | None = Field(None, description="Function tools: {type, name, parameters, ...}.")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    store: bool | None = Field(None, description="Accepted; nothing is kept: the response says store false.")
    previous_response_id: str | None = Field(None, description="Refused: this server keeps no responses.")
    metadata: dict[str, str] | None = None
    user: str | None = None

    def chat(self) -> ChatRequest:
        """The chat completion this response is."""
        if self.previous_response_id is not None:
            raise BadRequest(
                "This server keeps no responses (store is not supported): send the whole conversation as input.",
                param="previous_response_id",
            )
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for item in items:
            messages.extend(_message(item, messages))
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": self.stream,
            "stream_options": {"include_usage": True} if self.stream else None,
            "response_format": _format(self.text),
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.tools:
            body["tools"] = [_tool(tool) for tool in self.tools]
        if self.tool_choice is not None:
            choice = self.tool_choice
            body["tool_choice"] = (
                {"type": "function", "function": {"name": choice.get("name")}} if isinstance(choice, dict) else choice
            )
        try:
            return ChatRequest.model_validate(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise BadRequest(f"{'.'.join(map(str, error['loc']))}: {error['msg']}", param="input") from None

    def echoed(self) -> dict[str, Any]:
        """The request's settings as a response object repeats them."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "tools": self.tools or [],
            "tool_choice": self.tool_choice or "auto",
            "parallel_tool_calls": self.parallel_tool_calls,
            "text": self.text or {"format": {"type": "text"}},
            "metadata": self.metadata or {},
            "previous_response_id": None,
            "store": False,  # nothing is kept, whatever the request asked
        }


def _message(item: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of one input item; a function call joins the assistant message before it."""
    kind = item.get("type", "message")
    if kind == "message":
        content = item.get("content")
        if isinstance(content, list):
            if any(part.get("type") not in ("input_text", "output_text", "text") for part in content):
                raise BadRequest("Only text content is supported in input messages.", param="input")
            content = "".join(part.get("text", "") for part in content)
        return [{"role": item.get("role"), "content": content}]
    if kind == "function_call":
        call = {
            "id": item.get("call_id"),
            "type": "function",
            "function": {k: item.get(k) for k in ("name", "arguments")},
        }
        if messages and messages[-1]["role"] == "assistant":
            messages[-1].setdefault("tool_calls", []).append(call)
            return []
        return [{"role": "assistant", "content": None, "tool_calls": [call]}]
    if kind == "function_call_output":
        return [{"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")}]
    raise BadRequest(f"Input items of type {kind!r} are not supported here.", param="input")


def _format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """text.format as chat's response_format."""
    spec = (text or {}).get("format") or {"type": "text"}
    if spec.get("type") != "json_schema":
        return {"type": spec.get("type")}
    return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if k != "type"}}


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A Responses function tool (flat) as chat's (nested)."""
    if tool.get("type") != "function":
        raise BadRequest(f"Tools of type {tool.get('type')!r} are not supported; only function tools.", param="tools")
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}


@router.post("/responses")
async def responses(body: ResponsesRequest, request: Request, tenant: CallerDep, parts: ServerDep) -> Response:
    """Create a response (whole or streamed as Responses events); stateless: nothing is stored."""
    answer = await chat_completions(body.chat(), request, tenant, parts)
    head = {
        "id": f"resp_{request.state.request_id}",
        "object": "response",
        "created_at": int(time.time()),
        "model": body.model,
        **body.echoed(),
    }
    if isinstance(answer, StreamingResponse):
        answer.body_iterator = _events(answer.body_iterator, head)
        return answer
    chat = json.loads(answer.body)
    choice = chat["choices"][0]
    message = choice["message"]
    output = [_text_item(f"msg_{secrets.token_hex(12)}", message["content"])] if message.get("content") else []
    output += [_call_item(call) for call in message.get("tool_calls") or []]
    return JSONResponse(_finished({**head, "model": chat["model"]}, output, choice["finish_reason"], chat["usage"]))


def _text_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    return {
        "type": "function_call",
        "id": f"fc_{call['id'].removeprefix('call_')}",
        "call_id": call["id"],
        "name": function["name"],
        "arguments": function["arguments"],
        "status": "completed",
    }


def _finished(
    head: dict[str, Any], output: list[dict[str, Any]], finish: str | None, usage: dict[str, int] | None
) -> dict[str, Any]:
    """The response object once its generation ended: cut by max_output_tokens is "incomplete", as OpenAI says."""
    cut = finish == "length"
    counts = usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {
        **head,
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "error": None,
        "output": output,
        "usage": {
            "input_tokens": counts["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": counts["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": counts["total_tokens"],
        },
    }


async def _events(chunks: AsyncIterator[Any], head: dict[str, Any]) -> AsyncIterator[str]:
    """A chat completion's SSE chunks as the Responses API's events, each with its sequence number."""
    numbers = count()

    def event(kind: str, **data: Any) -> str:
        payload = {"type": kind, "sequence_number": next(numbers), **data}
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    started = {**head, "status": "in_progress", "output": [], "usage": None, "error": None}
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    item_id, where = f"msg_{secrets.token_hex(12)}", {"output_index": 0, "content_index": 0}
    text, calls, finish, usage, model, opened = "", {}, None, None, head["model"], False
    async for sse in chunks:
        data = (sse if isinstance(sse, str) else sse.decode()).removeprefix("data: ").strip()
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        if "error" in chunk:  # the chat stream failed: so does this one
            yield event("error", **{k: chunk["error"].get(k) for k in ("message", "code", "param")})
            return
        model, usage = chunk.get("model", model), chunk.get("usage") or usage
        for choice in chunk["choices"]:
            piece, finish = choice["delta"].get("content"), choice.get("finish_reason") or finish
            for fragment in choice["delta"].get("tool_calls") or []:  # a call's pieces, joined by its index
                call = calls.setdefault(fragment["index"], {"id": fragment.get("id"), "name": "", "arguments": ""})
                call["name"] += fragment.get("function", {}).get("name") or ""
                call["arguments"] += fragment.get("function", {}).get("arguments") or ""
            if piece:
                if not opened:
                    opened = True
                    yield event(
                        "response.output_item.added", output_index=0, item=_text_item(item_id, "", "in_progress")
                    )
                    part = {"type": "output_text", "text": "", "annotations": []}
                    yield event("response.content_part.added", item_id=item_id, **where, part=part)
                text += piece
                yield event("response.output_text.delta", item_id=item_id, **where, delta=piece, logprobs=[])
    output = []
    if opened:
        yield event("response.output_text.done", item_id=item_id, **where, text=text, logprobs=[])
        part = {"type": "output_text", "text": text, "annotations": []}
        yield event("response.content_part.done", item_id=item_id, **where, part=part)
        output.append(_text_item(item_id, text))
        yield event("response.output_item.done", output_index=0, item=output[-1])
    for call in calls.values():
        item, index = _call_item({"id": call["id"], "function": call}), len(output)
        yield event(
            "response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"}
        )
        at = {"item_id": item["id"], "output_index": index}
        yield event("response.function_call_arguments.delta", **at, delta=item["arguments"])
        yield event("response.function_call_arguments.done", **at, name=item["name"], arguments=item["arguments"])
        output.append(item)
        yield event("response.output_item.done", output_index=index, item=item)
    final = _finished({**head, "model": model}, output, finish, usage)
    yield event(f"response.{final['status']}", response=final)
