"""Request bodies of the OpenAI-compatible API, as pydantic models (they also document /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.errors import BadRequest


class StreamOptions(BaseModel):
    """Options of a streamed response."""

    include_usage: bool = Field(False, description="Send one last chunk with the request's token counts.")


class _Generate(BaseModel):
    """What /v1/completions and /v1/chat/completions share; unknown fields are ignored, as OpenAI clients expect."""

    model_config = ConfigDict(extra="ignore")

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
    n: Literal[1] = Field(1, description="Only one choice per request is supported.")
    ignore_eos: bool = Field(False, description="Generate past end-of-sequence, as vLLM's extension (benchmarks).")

    def stops(self) -> tuple[str, ...]:
        """The stop strings as a tuple."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise BadRequest("stop takes at most 4 non-empty strings.", param="stop")
        return tuple(stops)

    def limit(self) -> int | None:
        """The requested completion length."""
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generate):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(description="The text to continue (a list may hold one prompt).")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate; default 16, as OpenAI's.")

    def characters(self) -> int:
        """Characters of the prompt text, to refuse one that cannot fit before tokenizing it."""
        return sum(len(prompt) for prompt in ([self.prompt] if isinstance(self.prompt, str) else self.prompt))

    def text(self) -> str:
        """The one prompt of this request."""
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise BadRequest("Send one prompt per request.", param="prompt")
        return self.prompt[0]


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

    def characters(self) -> int:
        """Characters of every message's text, to refuse a chat that cannot fit before tokenizing it."""
        return sum(len(message.plain()["content"]) for message in self.messages)

    def limit(self) -> int | None:
        """The requested completion length, under either name."""
        return self.max_completion_tokens or self.max_tokens


class AdapterRequest(BaseModel):
    """An admin request naming one adapter."""

    model: str = Field(description="An adapter reference: NAME, NAME@vX.Y.Z, NAME#STAGE or NAME@latest.")
