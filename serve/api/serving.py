"""One generation request from admission to its last byte: limits, adapter, engine, the answer whole or streamed.

A request fans out into one generation per prompt and candidate; their chunks are merged as they come, a client
that hangs up aborts them, and what the request held of its tenant's limits is given back however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from adapterctl.serve.api.dependencies import ServerState
from adapterctl.serve.api.formatting import DONE, Choice, Echo, Shape, sse, take, usage
from adapterctl.serve.api.metrics import (
    ADAPTER_LOAD_SECONDS,
    CACHE_HITS,
    FIRST_TOKEN_SECONDS,
    MODEL_REQUESTS,
    MODEL_SECONDS,
    MODEL_TOKENS,
    TOKENS,
    requested_as,
)
from adapterctl.serve.api.protocol import ChatRequest, CompletionRequest
from adapterctl.serve.api.sampling import bound_prompt_logprobs, for_choice, prompt_field, sampling
from adapterctl.serve.api.tenants import Hold, Tenant
from adapterctl.serve.engines.base import AdapterSpec, Chunk, Engine, EngineError, GenerateRequest
from adapterctl.serve.errors import BadRequest, ServeError, Unavailable, from_engine

log = logging.getLogger("serve")
# Chunks per generation held between the engine and the response; a response its client does not read stops here.
BUFFERED = 4


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: TOKENS runs off the event loop; CHARACTERS bound its text before that."""

    tokens: Callable[[], list[int]]
    characters: int = 0  # of text still to tokenize; 0 for token ids
    text: str | None = None  # the prompt as sent, when it came as text (echo repeats it)


class _InFlight:
    """A request's generations (one per choice) in the engine and the tenant's limits it holds until it ends."""

    def __init__(
        self,
        request: Request,
        engine: Engine,
        submit: Callable[[GenerateRequest], AsyncIterator[Chunk]],
        generations: list[GenerateRequest],
        prompts: list[int],
        release: Callable[[int], None],
        started: float,
    ) -> None:
        self.request = request
        self.engine = engine
        self.submit = submit  # a generation's chunks, once the tenants' fair share lets it into the engine
        self.pumps: list[asyncio.Task[None]] = []  # one per generation, reading its chunks
        self.generations = generations
        self.choices = [Choice(prompt) for prompt in prompts]  # the prompt each generation continues
        self.release = release
        self.started = started
        self.timed = False
        self.ended = False
        self.answered = False  # the whole answer (or its error) was handed to the client
        # Each prompt counts once, however many choices continue it, as OpenAI counts them.
        counted = {p: len(g.prompt_ids) for p, g in zip(prompts, generations, strict=True)}
        self.prompt_tokens = sum(counted.values())
        TOKENS.labels("prompt").inc(self.prompt_tokens)
        request.state.prompt_tokens = self.prompt_tokens

    async def chunks(self) -> AsyncIterator[tuple[int, Chunk]]:
        """(generation index, chunk) as the engine produces them, timing the first."""
        async for index, chunk in _merged([self.submit(g) for g in self.generations], self.pumps):
            if not self.timed:
                self.timed = True
                FIRST_TOKEN_SECONDS.observe(time.perf_counter() - self.started)
            choice = self.choices[index]
            choice.finish_reason = chunk.finish_reason
            choice.tokens += len(chunk.token_ids)
            yield index, chunk

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def usage(self) -> dict[str, int]:
        """Token counts as OpenAI reports them."""
        return usage(self.prompt_tokens, self.completion_tokens)

    async def end(self) -> None:
        """Give back what the request held, once; generations still running (client gone) are aborted."""
        if self.ended:
            return
        self.ended = True
        self.release(self.prompt_tokens + self.completion_tokens)
        for pump in self.pumps:  # those still waiting for the engine leave the queue
            pump.cancel()
        for generation, choice in zip(self.generations, self.choices, strict=True):
            if choice.finish_reason is None:
                await self.engine.abort(generation.request_id)
        TOKENS.labels("completion").inc(self.completion_tokens)
        self.request.state.completion_tokens = self.completion_tokens
        model, tenant = self.request.state.model, self.request.state.tenant
        MODEL_REQUESTS.labels(model, tenant).inc()
        MODEL_TOKENS.labels(model, tenant, "prompt").inc(self.prompt_tokens)
        MODEL_TOKENS.labels(model, tenant, "completion").inc(self.completion_tokens)
        MODEL_SECONDS.labels(model).observe(time.perf_counter() - self.started)


async def _merged(
    streams: list[AsyncIterator[Chunk]], tasks: list[asyncio.Task[None]]
) -> AsyncIterator[tuple[int, Chunk]]:
    """The chunks of several streams as they come, each with its stream's index; the first error ends it. TASKS gets
    the tasks reading them, for the caller to cancel however the iteration ends.

    At most BUFFERED chunks a stream wait here: past that its stream is not read (so not generated) until the caller
    takes some, which a client that stops reading its response stops doing."""
    queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue(BUFFERED * len(streams))

    async def pump(index: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        except Exception as exc:
            await queue.put((index, exc))
        await queue.put((index, None))

    tasks.extend(asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams))
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


class _EventStream(StreamingResponse):
    """Server-sent events that end the run however the stream ends: finished, failed or the client gone."""

    def __init__(self, events: AsyncIterator[str], run: _InFlight) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.run.end()
        if not self.run.answered:  # the client hung up mid-stream: the request log says 499, as nginx does
            self.run.request.state.status = _ClientGone.status


async def generate(
    request: Request, server: ServerState, tenant: Tenant, body: CompletionRequest | ChatRequest, prompts: list[Prompt]
) -> Response:
    """Admit, resolve, tokenize, check and submit one request (one generation per prompt and candidate); answer
    with the whole texts or a stream."""
    _admit(server, prompts)
    started = time.perf_counter()
    candidates = body.candidates()
    hold = server.limiter.acquire(tenant, len(prompts), candidates)  # before tokenizing: refused work costs nothing
    release = partial(server.limiter.release, hold)
    owners = [p for p in range(len(prompts)) for _ in range(candidates)]  # the prompt each generation continues
    try:
        prompt_ids, generations = await _prepare(request, server, tenant, body, prompts, owners, hold)
    except EngineError as exc:
        release(0)
        raise from_engine(exc) from None
    except BaseException:
        release(0)
        raise
    submit = requested_as(body.model, partial(server.fairness.generate, tenant.name, tenant.weight))
    run = _InFlight(request, server.engine, submit, generations, owners, release, started)
    shape = Shape(isinstance(body, ChatRequest), server.engine, body.reported_logprobs(), body.tool_use())
    echo = [(prompt.text, ids) for prompt, ids in zip(prompts, prompt_ids, strict=True)] if body.echoes() else None
    if shape.top is not None and not shape.chat and echo is None:
        _offset(run.choices, prompts, prompt_ids, server.engine)
    head = shape.head(request.state.request_id, request.state.model, body.stream)
    if body.stream:
        return _EventStream(_events(run, shape, head, body.include_usage, echo), run)
    return await _whole(run, shape, head, body.n, echo)


def _admit(server: ServerState, prompts: list[Prompt]) -> None:
    """Turn the request away while the server drains, or when it sends more prompts than the server takes."""
    if server.draining:
        raise Unavailable("The server is shutting down; send the request again to another instance.")
    if len(prompts) > server.settings.max_prompts:
        raise BadRequest(
            f"prompt is a list of {len(prompts)} prompts; this server takes at most {server.settings.max_prompts} "
            "per request (--max-prompts): split it into several requests.",
            param="prompt",
        )


async def _prepare(
    request: Request,
    server: ServerState,
    tenant: Tenant,
    body: CompletionRequest | ChatRequest,
    prompts: list[Prompt],
    owners: list[int],
    hold: Hold,
) -> tuple[list[list[int]], list[GenerateRequest]]:
    """Resolve the adapter, tokenize and check every generation, reserve the most the request may use and load the
    adapter; returns each prompt's token ids and the generations. Every refusal comes now, a clean error, not a
    broken stream later."""
    spec = await server.catalog.resolve(body.model, tenant.may_use)
    request.state.model = spec.key if spec else server.engine.model_id
    prompt_ids = [await _tokens(server, body, prompt) for prompt in prompts]
    samplings = [sampling(server, tenant, body, len(ids)) for ids in prompt_ids]
    bound_prompt_logprobs(server, samplings, prompt_ids, body.candidates())
    # The most the request may use: each prompt once (as usage counts it), every generation to its max_tokens.
    most = sum(len(ids) + body.candidates() * s.max_tokens for ids, s in zip(prompt_ids, samplings, strict=True))
    server.limiter.reserve(hold, most)
    samplings = await server.engine.prepare(samplings)  # a JSON schema: compiled once, off the event loop
    generations = []
    for number, p in enumerate(owners):
        sampled = for_choice(samplings[p], number)
        generation = GenerateRequest(f"{request.state.request_id}-{number}", tuple(prompt_ids[p]), spec, sampled)
        server.engine.check(generation)  # bad input is a 400 now, not a broken stream later
        generations.append(generation)
    if spec is not None:
        await _load(server.engine, spec)  # load errors are a 422 now, not a broken stream later
    if server.catalog.fidelity is not None:
        server.catalog.fidelity.count(spec.key if spec else None)
    return prompt_ids, generations


async def _tokens(server: ServerState, body: CompletionRequest | ChatRequest, prompt: Prompt) -> list[int]:
    """The prompt's token ids, tokenized off the event loop; a text too long for the context is refused untokenized."""
    context, field = server.engine.context_length, prompt_field(body)
    if prompt.characters > server.engine.prompt_characters:
        raise BadRequest(
            f"The prompt is {prompt.characters} characters; this model's context holds {context} tokens for prompt "
            f"and completion together, which no text over {server.engine.prompt_characters} characters fits.",
            param=field,
        )
    prompt_ids = await asyncio.to_thread(prompt.tokens)
    if not prompt_ids:  # as vLLM: a model needs at least one token to continue from
        raise BadRequest(f"The {field} is empty: send at least one token of text.", param=field)
    return prompt_ids


async def _load(engine: Engine, spec: AdapterSpec) -> None:
    """Have SPEC's adapter in the engine, timing a load and counting a hit."""
    started = time.perf_counter()
    if await engine.load(spec):
        ADAPTER_LOAD_SECONDS.observe(time.perf_counter() - started)
    else:
        CACHE_HITS.inc()


def _offset(choices: list[Choice], prompts: list[Prompt], prompt_ids: list[list[int]], engine: Engine) -> None:
    """Start each choice's text_offset after its prompt's text, which a completion without echo does not repeat."""
    lengths = [len(p.text if p.text is not None else engine.decode(ids)) for p, ids in zip(prompts, prompt_ids)]
    for choice in choices:
        choice.start = lengths[choice.prompt]


async def _whole(run: _InFlight, shape: Shape, head: dict[str, Any], n: int, echo: Echo | None) -> JSONResponse:
    """The whole answer in one body, best_of's N best candidates per prompt, unless the client hangs up first."""
    try:
        await _unless_gone(run, echo)
    except Exception as exc:  # an engine failure of this request alone: its own clean error
        raise _failure(exc, run.request) from None
    finally:
        await run.end()
    kept = _best(run.choices, n)
    choices = [shape.choice(i, c.text, c.finish_reason, c.logprobs, c.start) for i, c in enumerate(kept)]
    return JSONResponse({**head, "choices": choices, "usage": run.usage()})


def _best(choices: list[Choice], n: int) -> list[Choice]:
    """Per prompt, the N candidates with the highest log-probability per token, in their original order."""
    kept: list[Choice] = []
    for prompt in sorted({c.prompt for c in choices}):
        mine = [c for c in choices if c.prompt == prompt]
        if len(mine) > n:
            best = sorted(mine, key=Choice.mean_logprob, reverse=True)[:n]
            mine = [c for c in mine if c in best]
        kept.extend(mine)
    return kept


class _ClientGone(ServeError):
    """The client hung up before its answer was ready; logged with nginx's 499, sent to nobody."""

    status = 499


async def _unless_gone(run: _InFlight, echo: Echo | None) -> None:
    """Collect RUN's whole texts, unless the client disconnects first: then stop waiting, freeing its rows at once."""

    async def collect() -> None:
        async for index, chunk in run.chunks():
            take(run.choices[index], chunk, run.generations[index], run.engine, echo)

    async def hung_up() -> None:
        while (await run.request.receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answer, gone):
            task.cancel()
    if not answer.done():
        raise _ClientGone("The client closed the connection.")
    answer.result()


async def _events(
    run: _InFlight, shape: Shape, head: dict[str, Any], include_usage: bool, echo: Echo | None
) -> AsyncIterator[str]:
    """The SSE body: OpenAI-format chunks, usage last if asked, then [DONE]; an engine failure is an error event."""
    usage = {"usage": None} if include_usage else {}  # OpenAI's chunks say null until the last
    opened = not shape.chat
    whole = shape.tools is not None and not shape.tools.streams  # tool calls are parsed from the whole text
    try:
        async for index, chunk in run.chunks():
            if not opened:  # the assistant's role opens a chat stream with the first token, as vLLM: clients time it
                opened = True
                for number in range(len(run.generations)):
                    yield sse({**head, "choices": [shape.role(number)], **usage})
            choice = run.choices[index]
            offset = choice.start + choice.length
            text, scored = take(choice, chunk, run.generations[index], run.engine, echo, keep=whole)
            if whole:  # the text goes out at the end
                if chunk.finish_reason is None:
                    continue
                text, scored, offset = choice.text, choice.logprobs, choice.start
            if not (text or scored or chunk.finish_reason):
                continue  # tokens that add no whole character yet: nothing to send
            delta = shape.delta(index, text, chunk.finish_reason, scored, offset)
            yield sse({**head, "choices": [delta], **usage})
    except Exception as exc:  # the status line is sent: the failure can only travel as an event
        run.answered = True
        yield sse(_failure(exc, run.request).body())
        return
    if include_usage:
        yield sse({**head, "choices": [], "usage": run.usage()})
    run.answered = True
    yield DONE


def _failure(exc: Exception, request: Request) -> ServeError:
    """A failure inside the engine as the error the client sees; the details go to the log."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, EngineError):
        return from_engine(exc)
    log.error("request_id=%s failed in the engine", request.state.request_id, exc_info=exc)
    return ServeError(f"The engine failed on this request ({type(exc).__name__}); see the server log.")
