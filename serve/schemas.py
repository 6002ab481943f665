"""Request bodies of the OpenAI-compatible API, as pydantic models (they also document /docs)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.engine import MAX_LOGPROBS
from serve.errors import BadRequest


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
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: a non-empty list is a 400.")
    tool_choice: str | dict[str, Any] | None = Field(None, description='Only "none" (there are no tools).')
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
        if self.tools:
            raise BadRequest(
                "Tool calls are not supported by this server; send the request without tools.", param="tools"
            )
        if self.tool_choice not in (None, "none"):
            raise BadRequest("tool_choice must be 'none': this server has no tools.", param="tool_choice")
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


class Message(BaseModel):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        """The message as the chat template takes it: text content; `developer` is the system role."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Generate):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens; wins over it.")
    logprobs: bool = Field(False, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: this many likeliest tokens per position."
    )

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
