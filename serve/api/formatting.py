"""OpenAI-shaped output: a choice's text and log-probabilities, whole bodies, streamed chunks, SSE and usage."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from adapterctl.serve.engines.base import Chunk, Engine, GenerateRequest, TokenLogprob
from adapterctl.serve.api.tools import ToolUse

# A token with its log-probability, or an echoed first prompt token's id: nothing predicts it, so it has no score.
Scored = TokenLogprob | int
# Per prompt, its text as sent (None for token ids) and its token ids: what echo repeats before the completion.
Echo = list[tuple[str | None, list[int]]]


@dataclass
class Choice:
    """What one choice has produced so far: its text and, when asked for, its tokens' log-probabilities."""

    prompt: int  # which prompt of the request it continues
    text: str = ""
    logprobs: list[Scored] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0  # generated so far
    length: int = 0  # characters of text so far (a stream keeps no text, only this)
    echoed: bool = False
    start: int = 0  # where its text starts in prompt + text (text_offset counts from the prompt's start)

    def mean_logprob(self) -> float:
        """Log-probability per generated token: how best_of ranks candidates, as OpenAI does."""
        scored = [t.logprob for t in self.logprobs if isinstance(t, TokenLogprob)]
        return sum(scored) / max(len(scored), 1)


class Shape:
    """How an endpoint spells its results; /v1/completions and /v1/chat/completions differ only here."""

    def __init__(self, chat: bool, engine: Engine, top: int | None, tools: ToolUse | None = None) -> None:
        self.chat = chat
        self.engine = engine
        self.top = top  # None: no log-probabilities in the answer
        self.tools = tools  # None: the answer is text; else it holds the calls of a tool_choice
        self.prefix, self.object = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def head(self, request_id: str, model: str, stream: bool) -> dict[str, Any]:
        """The fields every body (or every chunk) of one response starts with."""
        return {
            "id": f"{self.prefix}-{request_id}",
            "object": self.chunk_object if stream else self.object,
            "created": int(time.time()),
            "model": model,
        }

    def choice(self, index: int, text: str, finish: str | None, scored: list[Scored], offset: int) -> dict[str, Any]:
        """One choice of a whole response."""
        logprobs = self.logprobs(scored, offset)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tools is not None:
                message, finish = self.tools.message(text, finish)
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, index: int, text: str, finish: str | None, scored: list[Scored], offset: int = 0) -> dict[str, Any]:
        """One choice of a streamed chunk."""
        logprobs = self.logprobs(scored, offset)
        if self.chat:
            delta = {"content": text} if text or finish is None else {}
            if self.tools is not None:
                delta, finish = self.tools.delta(text, finish, first=offset == 0)
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def role(self, index: int) -> dict[str, Any]:
        """The choice of a chat stream's first chunk, which names the assistant's role."""
        return {**self.delta(index, "", None, []), "delta": {"role": "assistant", "content": ""}}

    def logprobs(self, scored: list[Scored], offset: int) -> dict[str, Any] | None:
        """OpenAI's log-probabilities of these tokens (None for a first prompt token, which nothing predicts)."""
        if self.top is None:
            return None
        known = [t for t in scored if isinstance(t, TokenLogprob)]
        first = [t for t in scored if isinstance(t, int)]
        ids = sorted({t.token for t in known} | {i for t in known for i, _ in t.top} | set(first))
        names = dict(zip(ids, self.engine.token_texts(ids), strict=True))
        if self.chat:
            return {
                "content": [
                    {
                        **_named(names[t.token], t.logprob),
                        "top_logprobs": [_named(names[i], lp) for i, lp in t.top[: self.top]],
                    }
                    for t in known
                ]
            }
        texts = [names[t] if isinstance(t, int) else names[t.token] for t in scored]
        offsets, at = [], offset
        for text in texts:
            offsets.append(at)
            at += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [None if isinstance(t, int) else t.logprob for t in scored],
            "top_logprobs": [
                None if isinstance(t, int) else {names[i]: lp for i, lp in t.top[: self.top]} for t in scored
            ],
            "text_offset": offsets,
        }


def _named(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def take(
    choice: Choice, chunk: Chunk, generation: GenerateRequest, engine: Engine, echo: Echo | None, keep: bool = True
) -> tuple[str, list[Scored]]:
    """Add CHUNK to CHOICE (its text and scores only if KEEP); returns the text and scored tokens it adds (the
    echoed prompt before its first)."""
    text = chunk.text
    scored: list[Scored] = list(chunk.logprobs)
    if echo is not None and not choice.echoed:
        choice.echoed = True
        prompt_text, ids = echo[choice.prompt]
        prompt_scores: list[Scored] = [ids[0], *(chunk.prompt_logprobs or ())]
        text = (prompt_text if prompt_text is not None else engine.decode(ids)) + text
        scored = [*(prompt_scores if generation.sampling.prompt_logprobs is not None else []), *scored]
    choice.length += len(text)
    if keep:  # a stream sends each piece once: kept, a long one would hold its whole text and scores until it ends
        choice.text += text
        choice.logprobs.extend(scored)
    return text, scored


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Token counts as OpenAI reports them."""
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def sse(data: dict[str, Any]) -> str:
    """One server-sent event carrying DATA as compact JSON."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"  # the event that ends an OpenAI stream
