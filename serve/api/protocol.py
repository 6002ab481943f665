"""Request bodies of the OpenAI-compatible API, as pydantic models (they also document /docs)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapterctl.serve.engines.base import MAX_LOGPROBS
from adapterctl.serve.errors import BadRequest
from adapterctl.serve.api.tools import ToolUse


class StreamOptions(BaseModel):
    """Options of a streamed response."""

    include_usage: bool = Field(False, description="Send one last chunk with the request's token counts.")


MAX_CHOICES = 16  # n and best_of: generations one request may ask for per prompt


class _Generate(BaseModel):
    """What /v1/completions and /v1/chat/completions share; a field the server does not know is a 400 naming it,
    as OpenAI answers, so a misspelt or unsupported option never passes silently."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="An adapter reference (NAME, NAME@vX.Y.Z, NAME#STAGE, NAME@latest) or the base id.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(
        None, ge=0, le=2, allow_inf_nan=False, description="0 is greedy; default 1; below 0.01 counts as 0.01."
    )
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass; default 1.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the completion (not returned).")
    seed: int | None = Field(
        None, ge=-(1 << 63), le=(1 << 63) - 1, description="Same seed, same request: same text (a 64-bit integer)."
    )
    stream: bool = Field(False, description="Send server-sent events as tokens are generated.")
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate for each prompt.")
    ignore_eos: bool = Field(False, description="Generate past end-of-sequence, as vLLM's extension (benchmarks).")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Penalise every token already generated.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Penalise tokens by how often they were generated.")
    logit_bias: dict[int, float] | None = Field(None, description="Token id -> bias (-100 to 100) added to its logit.")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end the completion, as vLLM's.")
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text"}, "json_object" or "json_schema" (enforced while decoding).'
    )
    user: str | None = Field(None, description="Metadata: accepted and ignored.")
    metadata: dict[str, Any] | None = Field(None, description="Metadata: accepted and ignored.")
    store: bool | None = Field(None, description="Metadata: accepted and ignored (nothing is stored).")

    def stops(self) -> tuple[str, ...]:
        """The stop strings as a tuple."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise BadRequest("stop takes at most 4 non-empty strings.", param="stop")
        return tuple(stops)

    def limit(self) -> int | None:
        """The requested completion length."""
        return self.max_tokens

    def candidates(self) -> int:
        """Generations per prompt (best_of, else n); refuses what the server does not do."""
        return self.n

    def biases(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token, bias) pairs, each bias within OpenAI's -100 to 100."""
        pairs = tuple(sorted((self.logit_bias or {}).items()))
        if any(not -100 <= bias <= 100 for _, bias in pairs):
            raise BadRequest("logit_bias values must lie between -100 and 100.", param="logit_bias")
        return pairs

    def schema(self) -> str | None:
        """The JSON schema (as text) that response_format asks the output to match; None for plain text."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return json.dumps({"type": "object"})
        if kind == "json_schema":
            schema = ((self.response_format or {}).get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise BadRequest(
                    "response_format json_schema needs json_schema.schema, a JSON object.", param="response_format"
                )
            return json.dumps(schema)
        raise BadRequest(
            f"response_format type {kind!r} is not one of text, json_object, json_schema.", param="response_format"
        )

    def reported_logprobs(self) -> int | None:
        """Most likely tokens to report per position, or None for no log-probabilities."""
        return None

    def tool_use(self) -> ToolUse | None:
        """The tools the answer may or must call; None: a plain answer."""
        return None

    def echoes(self) -> bool:
        """Whether each choice starts with its prompt."""
        return False

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generate):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="The text to continue, token ids, or a list of either: one choice (or n) per prompt."
    )
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate; default 16, as OpenAI's.")
    echo: bool = Field(False, description="Start each choice with its prompt (and its log-probabilities).")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Log-probability of each token and of this many likeliest ones."
    )
    best_of: int | None = Field(
        None, ge=1, le=MAX_CHOICES, description="Generate this many per prompt, return the n likeliest per token."
    )
    suffix: str | None = Field(None, description="Not supported: a non-null suffix is a 400.")

    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request, text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise BadRequest("prompt is an empty list; send at least one prompt.", param="prompt")
        return list(prompt)

    def candidates(self) -> int:
        if self.suffix is not None:
            raise BadRequest("suffix is not supported by this server.", param="suffix")
        n = super().candidates()
        best = self.best_of or n
        if best < n:
            raise BadRequest(f"best_of ({best}) must be at least n ({n}).", param="best_of")
        if best > n and self.stream:
            raise BadRequest("best_of above n cannot be streamed: the best are known only at the end.", param="best_of")
        return best

    def reported_logprobs(self) -> int | None:
        return self.logprobs

    def echoes(self) -> bool:
        return self.echo


class TextPart(BaseModel):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class Function(BaseModel):
    """A function the model may call: its name and the JSON schema of its arguments."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments; default any object.")
    strict: bool | None = Field(None, description="Accepted: arguments of a forced call always match the schema.")


class Tool(BaseModel):
    """A tool of a chat request: a function."""

    type: Literal["function"]
    function: Function


class CalledFunction(BaseModel):
    """The function of an earlier call: its name and arguments as JSON text."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """A call an earlier assistant turn made."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    """One chat message; an assistant turn may carry the tool calls it made, a tool turn one call's result."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, description="Of a tool message: the call it answers.")
    name: str | None = Field(None, description="Metadata: accepted and ignored.")

    def plain(self) -> dict[str, Any]:
        """The message as the chat template takes it: text content; `developer` is the system role; calls with their
        arguments as objects, as templates with a tools format expect them."""
        content = self.content if isinstance(self.content, str) or self.content is None else None
        if content is None:
            content = "".join(part.text for part in self.content or [])
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [_called(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _called(call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        raise BadRequest(f"tool call {call.id}'s arguments are not JSON.", param="messages") from None
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


class ChatRequest(_Generate):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens; wins over it.")
    logprobs: bool = Field(False, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: this many likeliest tokens per position."
    )
    tools: list[Tool] | None = Field(None, description="Functions the model may call (rendered by the chat template).")
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None, description='"auto" (default with tools), "none", "required" or {"type": "function", "function": ...}.'
    )
    parallel_tool_calls: bool = Field(True, description="Whether an answer may make several calls.")

    def tool_use(self) -> ToolUse | None:
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if isinstance(choice, dict):
            choice = ((choice.get("function") or {}).get("name")) or ""
            if not choice:
                raise BadRequest(
                    'tool_choice names a function as {"type": "function", "function": {"name": ...}}.',
                    param="tool_choice",
                )
        if choice == "none":
            return None
        tools = tuple(tool.model_dump(exclude_none=True) for tool in self.tools or [])
        if choice not in ("auto", "required") and choice not in {t["function"]["name"] for t in tools}:
            raise BadRequest(f"tool_choice names {choice!r}, which is not one of the tools.", param="tool_choice")
        if not tools:
            raise BadRequest(f"tool_choice {choice!r} needs tools.", param="tool_choice")
        return ToolUse(tools, choice, self.parallel_tool_calls)

    def schema(self) -> str | None:
        """response_format's schema, or the one a forced tool call must match."""
        forced = self.tool_use()
        schema = forced.schema() if forced else None
        if schema is None:
            return super().schema()
        if (self.response_format or {}).get("type", "text") != "text":
            raise BadRequest("response_format cannot be combined with a forced tool call.", param="response_format")
        return json.dumps(schema)

    def rendered_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template lists for the model: none when tool_choice is "none"."""
        use = self.tool_use()
        return list(use.tools) if use else None

    def reported_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def characters(self) -> int:
        """Characters of every message's text, to refuse a chat that cannot fit before tokenizing it."""
        return sum(len(message.plain()["content"]) for message in self.messages)

    def limit(self) -> int | None:
        """The requested completion length, under either name."""
        return self.max_completion_tokens or self.max_tokens


class AdapterRequest(BaseModel):
    """An admin request naming one adapter."""

    model: str = Field(description="An adapter reference: NAME, NAME@vX.Y.Z, NAME#STAGE or NAME@latest.")
