"""One generation request from admission to its last byte: limits, adapter, engine, OpenAI-shaped output."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serve.dependencies import Server
from serve.engine import Chunk, Generation, Sampling
from serve.errors import BadRequest, ServeError, Unavailable
from serve.metrics import FIRST_TOKEN_SECONDS, TOKENS
from serve.schemas import ChatRequest, CompletionRequest
from serve.tenants import Tenant

log = logging.getLogger("serve")


class _Shape:
    """How an endpoint spells its results; /v1/completions and /v1/chat/completions differ only here."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.prefix, self.object = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def choice(self, text: str, finish: str | None) -> dict[str, Any]:
        """The one choice of a whole response."""
        if self.chat:
            return {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def delta(self, text: str, finish: str | None) -> dict[str, Any]:
        """The one choice of a streamed chunk."""
        if self.chat:
            delta = {"content": text} if text or finish is None else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


class _Run:
    """A submitted generation and the tenant slot its request holds until it ends."""

    def __init__(self, request: Request, generation: Generation, release: Callable[[], None], started: float) -> None:
        self.request = request
        self.generation = generation
        self.release = release
        self.started = started
        self.finish_reason: str | None = None
        self.timed = False
        self.ended = False
        TOKENS.labels("prompt").inc(generation.prompt_tokens)
        request.state.prompt_tokens = generation.prompt_tokens

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The generation's chunks, timing the first."""
        async for chunk in self.generation:
            if not self.timed:
                self.timed = True
                FIRST_TOKEN_SECONDS.observe(time.perf_counter() - self.started)
            self.finish_reason = chunk.finish_reason
            yield chunk

    def usage(self) -> dict[str, int]:
        """Token counts as OpenAI reports them."""
        prompt, completion = self.generation.prompt_tokens, self.generation.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def end(self) -> None:
        """Give back what the request held, once; a generation still running (client gone) is cancelled."""
        if self.ended:
            return
        self.ended = True
        if self.finish_reason is None:
            self.generation.cancel()
        self.release()
        TOKENS.labels("completion").inc(self.generation.completion_tokens)
        self.request.state.completion_tokens = self.generation.completion_tokens


class _EventStream(StreamingResponse):
    """Server-sent events that end the run however the stream ends: finished, failed or the client gone."""

    def __init__(self, events: AsyncIterator[str], run: _Run) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.end()


async def generate(
    request: Request, server: Server, tenant: Tenant, body: CompletionRequest | ChatRequest, prompt_ids: list[int]
) -> Response:
    """Admit, resolve, check and submit one request; answer with the whole text or a stream of chunks."""
    if server.draining:
        raise Unavailable("The server is shutting down; send the request again to another instance.")
    started = time.perf_counter()
    release = server.limiter.acquire(tenant)
    try:
        spec = await server.catalog.resolve(body.model, tenant.may_use)
        model = spec.key if spec else server.engine.model_id
        request.state.model = model
        sampling = _sampling(server, tenant, body, len(prompt_ids))
        if spec is not None:
            await server.engine.load(spec)  # load errors are a 422 now, not a broken stream later
        generation = Generation(prompt_ids, spec, sampling)
        server.engine.submit(generation)
        if server.catalog.fidelity is not None:
            server.catalog.fidelity.count(spec.key if spec else None)
    except BaseException:
        release()
        raise
    run = _Run(request, generation, release, started)
    shape = _Shape(isinstance(body, ChatRequest))
    head = {
        "id": f"{shape.prefix}-{request.state.request_id}",
        "object": shape.chunk_object if body.stream else shape.object,
        "created": int(time.time()),
        "model": model,
    }
    if body.stream:
        return _EventStream(_events(run, shape, head, body.include_usage), run)
    try:
        text = await _unless_gone(request, run)
    finally:
        run.end()
    choice = shape.choice(text, run.finish_reason)
    return JSONResponse({**head, "choices": [choice], "usage": run.usage()})


class _ClientGone(ServeError):
    """The client hung up before its answer was ready; logged with nginx's 499, sent to nobody."""

    status = 499


async def _unless_gone(request: Request, run: _Run) -> str:
    """The whole text of RUN, unless the client disconnects first: then stop waiting, freeing its row at once."""

    async def text() -> str:
        return "".join([chunk.text async for chunk in run.chunks()])

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.ensure_future(text()), asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answer, gone):
            task.cancel()
    if not answer.done():
        raise _ClientGone("The client closed the connection.")
    return answer.result()


async def _events(run: _Run, shape: _Shape, head: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """The SSE body: OpenAI-format chunks, usage last if asked, then [DONE]; an engine failure is an error event."""
    usage = {"usage": None} if include_usage else {}  # OpenAI's chunks say null until the last
    if shape.chat:  # OpenAI opens a chat stream with the assistant's role
        role = {**shape.delta("", None), "delta": {"role": "assistant", "content": ""}}
        yield _sse({**head, "choices": [role], **usage})
    try:
        async for chunk in run.chunks():
            yield _sse({**head, "choices": [shape.delta(chunk.text, chunk.finish_reason)], **usage})
    except Exception as exc:  # the status line is sent: the failure can only travel as an event
        yield _sse(_failure(exc, run.request).body())
        return
    if include_usage:
        yield _sse({**head, "choices": [], "usage": run.usage()})
    yield "data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _failure(exc: Exception, request: Request) -> ServeError:
    """A failure inside the engine as the error the client sees; the details go to the log."""
    if isinstance(exc, ServeError):
        return exc
    log.error("request_id=%s failed in the engine", request.state.request_id, exc_info=exc)
    return ServeError(f"The engine failed on this request ({type(exc).__name__}); see the server log.")


def _sampling(server: Server, tenant: Tenant, body: CompletionRequest | ChatRequest, prompt_tokens: int) -> Sampling:
    """The request's sampling, its max_tokens within the server's cap, the tenant's limit and the context."""
    context = server.engine.context_length
    room = context - prompt_tokens
    field = "messages" if isinstance(body, ChatRequest) else "prompt"
    if room <= 0:
        raise BadRequest(
            f"The prompt is {prompt_tokens} tokens; this model's context holds {context} tokens "
            "for prompt and completion together.",
            param=field,
        )
    cap, whose = server.settings.max_tokens_cap, "this server's cap (--max-tokens-cap)"
    if tenant.max_tokens is not None and tenant.max_tokens < cap:
        cap, whose = tenant.max_tokens, f"the limit of tenant {tenant.name!r}"
    requested = body.limit()
    if requested is not None and requested > cap:
        raise BadRequest(f"max_tokens is {requested}, above {whose} of {cap} tokens per request.", param="max_tokens")
    if requested is not None and requested > room:
        raise BadRequest(
            f"This model's context holds {context} tokens; the prompt has {prompt_tokens}, "
            f"so max_tokens can be at most {room} (asked for {requested}).",
            param="max_tokens",
        )
    return Sampling(
        max_tokens=requested or min(cap, room),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stops(),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )
