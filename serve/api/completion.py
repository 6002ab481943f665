"""One generation request from admission to its last byte: limits, adapter, engine, OpenAI-shaped output."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from adapterctl.serve.api.dependencies import Server
from adapterctl.serve.engines.base import (
    AdapterSpec,
    Chunk,
    Engine,
    EngineError,
    GenerateRequest,
    Sampling,
    TokenLogprob,
)
from adapterctl.serve.errors import BadRequest, ServeError, Unavailable, from_engine
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
from adapterctl.serve.api.tenants import Tenant
from adapterctl.serve.api.tools import ToolUse

log = logging.getLogger("serve")
# As vLLM: a temperature above 0 but below this samples at this one (smaller ones overflow the scaled logits).
MIN_TEMPERATURE = 0.01
# Chunks per generation held between the engine and the response; a response its client does not read stops here.
BUFFERED = 4


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: TOKENS runs off the event loop; CHARACTERS bound its text before that."""

    tokens: Callable[[], list[int]]
    characters: int = 0  # of text still to tokenize; 0 for token ids
    text: str | None = None  # the prompt as sent, when it came as text (echo repeats it)


# A token with its log-probability, or an echoed first prompt token's id: nothing predicts it, so it has no score.
Scored = TokenLogprob | int


@dataclass
class _Choice:
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


class _Shape:
    """How an endpoint spells its results; /v1/completions and /v1/chat/completions differ only here."""

    def __init__(self, chat: bool, engine: Engine, top: int | None, tools: ToolUse | None = None) -> None:
        self.chat = chat
        self.engine = engine
        self.top = top  # None: no log-probabilities in the answer
        self.tools = tools  # None: the answer is text; else it holds the calls of a tool_choice
        self.prefix, self.object = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

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


class _Run:
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
        self.choices = [_Choice(prompt) for prompt in prompts]  # the prompt each generation continues
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
        prompt, completion = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

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

    def __init__(self, events: AsyncIterator[str], run: _Run) -> None:
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
    request: Request, server: Server, tenant: Tenant, body: CompletionRequest | ChatRequest, prompts: list[Prompt]
) -> Response:
    """Admit, resolve, tokenize, check and submit one request (one generation per prompt and candidate); answer
    with the whole texts or a stream."""
    if server.draining:
        raise Unavailable("The server is shutting down; send the request again to another instance.")
    started = time.perf_counter()
    if len(prompts) > server.settings.max_prompts:
        raise BadRequest(
            f"prompt is a list of {len(prompts)} prompts; this server takes at most {server.settings.max_prompts} "
            "per request (--max-prompts): split it into several requests.",
            param="prompt",
        )
    candidates = body.candidates()
    hold = server.limiter.acquire(tenant, len(prompts), candidates)  # before tokenizing: refused work costs nothing
    release = partial(server.limiter.release, hold)
    try:
        spec = await server.catalog.resolve(body.model, tenant.may_use)
        model = spec.key if spec else server.engine.model_id
        request.state.model = model
        prompt_ids = [await _tokens(server, body, prompt) for prompt in prompts]
        samplings = [_sampling(server, tenant, body, len(ids)) for ids in prompt_ids]
        _bound_prompt_logprobs(server, samplings, prompt_ids, candidates)
        # The most the request may use: each prompt once (as usage counts it), every generation to its max_tokens.
        most = sum(len(ids) + candidates * s.max_tokens for ids, s in zip(prompt_ids, samplings, strict=True))
        server.limiter.reserve(hold, most)
        samplings = await server.engine.prepare(samplings)  # a JSON schema: compiled once, off the event loop
        owners = [p for p in range(len(prompts)) for _ in range(candidates)]
        generations = []
        for number, p in enumerate(owners):
            seed = samplings[p].seed
            sampling = samplings[p] if seed is None else replace(samplings[p], seed=_wrap(seed + number))
            generation = GenerateRequest(f"{request.state.request_id}-{number}", tuple(prompt_ids[p]), spec, sampling)
            server.engine.check(generation)  # bad input is a 400 now, not a broken stream later
            generations.append(generation)
        if spec is not None:
            await _load(server.engine, spec)  # load errors are a 422 now, not a broken stream later
        if server.catalog.fidelity is not None:
            server.catalog.fidelity.count(spec.key if spec else None)
    except EngineError as exc:
        release(0)
        raise from_engine(exc) from None
    except BaseException:
        release(0)
        raise
    submit = requested_as(body.model, partial(server.fairness.generate, tenant.name, tenant.weight))
    run = _Run(request, server.engine, submit, generations, owners, release, started)
    shape = _Shape(isinstance(body, ChatRequest), server.engine, body.reported_logprobs(), body.tool_use())
    echo = [(prompt.text, ids) for prompt, ids in zip(prompts, prompt_ids, strict=True)] if body.echoes() else None
    if shape.top is not None and not shape.chat and echo is None:
        lengths = [
            len(p.text if p.text is not None else server.engine.decode(ids)) for p, ids in zip(prompts, prompt_ids)
        ]
        for choice in run.choices:
            choice.start = lengths[choice.prompt]
    head = {
        "id": f"{shape.prefix}-{request.state.request_id}",
        "object": shape.chunk_object if body.stream else shape.object,
        "created": int(time.time()),
        "model": model,
    }
    if body.stream:
        return _EventStream(_events(run, shape, head, body.include_usage, server.engine, echo), run)
    try:
        await _unless_gone(request, run, server.engine, echo)
    except Exception as exc:  # an engine failure of this request alone: its own clean error
        raise _failure(exc, request) from None
    finally:
        await run.end()
    kept = _best(run.choices, body.n)
    choices = [shape.choice(i, c.text, c.finish_reason, c.logprobs, c.start) for i, c in enumerate(kept)]
    return JSONResponse({**head, "choices": choices, "usage": run.usage()})


async def _load(engine: Engine, spec: AdapterSpec) -> None:
    """Have SPEC's adapter in the engine, timing a load and counting a hit."""
    started = time.perf_counter()
    if await engine.load(spec):
        ADAPTER_LOAD_SECONDS.observe(time.perf_counter() - started)
    else:
        CACHE_HITS.inc()


def _bound_prompt_logprobs(
    server: Server, samplings: list[Sampling], prompt_ids: list[list[int]], candidates: int
) -> None:
    """Refuse echo + logprobs whose prompt log-probabilities (each generation returns its own) exceed the bound."""
    top = samplings[0].prompt_logprobs
    if top is None:
        return
    positions = sum(len(ids) for ids in prompt_ids) * candidates
    bound = server.settings.max_prompt_logprobs
    if positions * (top + 1) > bound:
        raise BadRequest(
            f"echo with logprobs {top} returns {positions * (top + 1)} prompt log-probabilities here ({positions} "
            f"prompt tokens x generations, {top + 1} each), over this server's {bound}: send fewer prompts or "
            "choices per request, or a lower logprobs.",
            param="logprobs",
        )


def _wrap(seed: int) -> int:
    """A seed plus a choice number, kept within the 64 bits a seed may hold."""
    return (seed + (1 << 63)) % (1 << 64) - (1 << 63)


def _best(choices: list[_Choice], n: int) -> list[_Choice]:
    """Per prompt, the N candidates with the highest log-probability per token, in their original order."""
    kept: list[_Choice] = []
    for prompt in sorted({c.prompt for c in choices}):
        mine = [c for c in choices if c.prompt == prompt]
        if len(mine) > n:
            best = sorted(mine, key=_Choice.mean_logprob, reverse=True)[:n]
            mine = [c for c in mine if c in best]
        kept.extend(mine)
    return kept


def _take(
    choice: _Choice,
    chunk: Chunk,
    generation: GenerateRequest,
    engine: Engine,
    echo: list[tuple[str | None, list[int]]] | None,
    keep: bool = True,
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


class _ClientGone(ServeError):
    """The client hung up before its answer was ready; logged with nginx's 499, sent to nobody."""

    status = 499


async def _unless_gone(
    request: Request, run: _Run, engine: Engine, echo: list[tuple[str | None, list[int]]] | None
) -> None:
    """Collect RUN's whole texts, unless the client disconnects first: then stop waiting, freeing its rows at once."""

    async def collect() -> None:
        async for index, chunk in run.chunks():
            _take(run.choices[index], chunk, run.generations[index], engine, echo)

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
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
    run: _Run,
    shape: _Shape,
    head: dict[str, Any],
    include_usage: bool,
    engine: Engine,
    echo: list[tuple[str | None, list[int]]] | None,
) -> AsyncIterator[str]:
    """The SSE body: OpenAI-format chunks, usage last if asked, then [DONE]; an engine failure is an error event."""
    usage = {"usage": None} if include_usage else {}  # OpenAI's chunks say null until the last
    opened = not shape.chat
    try:
        async for index, chunk in run.chunks():
            if not opened:  # the assistant's role opens a chat stream with the first token, as vLLM: clients time it
                opened = True
                for number in range(len(run.generations)):
                    role = {**shape.delta(number, "", None, []), "delta": {"role": "assistant", "content": ""}}
                    yield _sse({**head, "choices": [role], **usage})
            choice = run.choices[index]
            offset = choice.start + choice.length
            whole = shape.tools is not None and not shape.tools.streams
            text, scored = _take(choice, chunk, run.generations[index], engine, echo, keep=whole)
            if whole:  # tool calls are parsed from the whole text: it goes out at the end
                if chunk.finish_reason is None:
                    continue
                text, scored, offset = choice.text, choice.logprobs, choice.start
            if not (text or scored or chunk.finish_reason):
                continue  # tokens that add no whole character yet: nothing to send
            delta = shape.delta(index, text, chunk.finish_reason, scored, offset)
            yield _sse({**head, "choices": [delta], **usage})
    except Exception as exc:  # the status line is sent: the failure can only travel as an event
        run.answered = True
        yield _sse(_failure(exc, run.request).body())
        return
    if include_usage:
        yield _sse({**head, "choices": [], "usage": run.usage()})
    run.answered = True
    yield "data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _failure(exc: Exception, request: Request) -> ServeError:
    """A failure inside the engine as the error the client sees; the details go to the log."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, EngineError):
        return from_engine(exc)
    log.error("request_id=%s failed in the engine", request.state.request_id, exc_info=exc)
    return ServeError(f"The engine failed on this request ({type(exc).__name__}); see the server log.")


async def _tokens(server: Server, body: CompletionRequest | ChatRequest, prompt: Prompt) -> list[int]:
    """The prompt's token ids, tokenized off the event loop; a text too long for the context is refused untokenized."""
    context, field = server.engine.context_length, _field(body)
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


def _field(body: CompletionRequest | ChatRequest) -> str:
    return "messages" if isinstance(body, ChatRequest) else "prompt"


def _sampling(server: Server, tenant: Tenant, body: CompletionRequest | ChatRequest, prompt_tokens: int) -> Sampling:
    """The request's sampling, its max_tokens within the server's cap, the tenant's limit and the context."""
    context = server.engine.context_length
    room = context - prompt_tokens
    field = _field(body)
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
    temperature = 1.0 if body.temperature is None else body.temperature
    top = body.reported_logprobs()
    return Sampling(
        max_tokens=requested or min(cap, room),
        temperature=temperature if temperature == 0 else max(temperature, MIN_TEMPERATURE),
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stops(),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=body.biases(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        json_schema=body.schema(),
        # best_of ranks candidates by their tokens' log-probabilities, so it needs them even when not shown.
        logprobs=top if top is not None else (0 if body.candidates() > body.n else None),
        prompt_logprobs=top if body.echoes() and top is not None else None,
    )
