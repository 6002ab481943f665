"""The server's FastAPI app: routers, errors in OpenAI's shape, one log line and metrics per request, draining."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterctl.serve import ui

from adapterctl.serve.api import docs
from adapterctl.serve.catalog.versions import Catalog
from adapterctl.serve.api.connections import Limits, protocol
from adapterctl.serve.api.dependencies import ServerState, Settings
from adapterctl.serve.api.formatting import sse
from adapterctl.serve.engines.base import Engine, EngineError
from adapterctl.serve.errors import BadRequest, PayloadTooLarge, ServeError, Unavailable, from_engine
from adapterctl.serve.api.metrics import ENGINES, MODEL_ERRORS, REQUEST_SECONDS, REQUESTS
from adapterctl.serve.api.routers import admin, health, openai, responses, vllm
from adapterctl.serve.api.tenants import Tenants

log = logging.getLogger("serve")
_QUIET = {"/healthz", "/readyz", "/health", "/metrics"}  # probes and scrapes: counted, not logged
# Once the engine died, running generations have their error at once; other requests get this long to finish.
DEAD_DRAIN_SECONDS = 5.0


def create_app(engine: Engine, catalog: Catalog, tenants: Tenants, settings: Settings) -> FastAPI:
    """An app serving ENGINE's base model and CATALOG's adapters to TENANTS."""
    parts = ServerState(engine, catalog, tenants, settings)
    # Files already in memory are not read, so not re-checked.
    catalog.in_memory = lambda key: key in engine.status().loaded

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        catalog.start()
        ENGINES.engines.append(engine)
        try:
            yield
        finally:
            ENGINES.engines.remove(engine)
            await _close(parts)

    app = FastAPI(
        title="adapters",
        summary="One base model, many LoRA adapters per request, through an OpenAI-compatible API.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served from packaged assets by serve.api.docs
        redoc_url=None,
    )
    app.state.server = parts
    docs.install(app)
    ui.install(app, ui.Console(catalog.registry, tenants, catalog, engine))
    app.state.flights = flights = _Flights()
    for router in (openai.router, responses.router, admin.router, admin.scrape, health.router, vllm.router):
        app.include_router(router)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)
    app.add_middleware(_Observe, flights=flights, max_body=settings.max_body_bytes)
    return app


@dataclass(frozen=True)
class Stopped:
    """How a server's run ended."""

    cut: int  # requests the drain had to cut
    dead: str | None = None  # why the engine died, when that stopped the server


def run(app: FastAPI, listener: socket.socket, limits: Limits | None = None) -> Stopped:
    """Serve APP on LISTENER, its connections within LIMITS, until SIGTERM or SIGINT, or until its engine dies, then
    drain.

    Running requests (streams too) may finish for drain_seconds (DEAD_DRAIN_SECONDS once the engine died: its
    generations have failed already); a second signal, or the end of that time, cuts the rest, each with an error.
    """
    config = uvicorn.Config(app, log_config=None, access_log=False, http=protocol(limits or Limits()))
    # uvicorn raises the signal it drained on once more after shutting down; handled by then, the exit is ours.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = _Uvicorn(config, app.state.server, app.state.flights)
    server.run(sockets=[listener])
    return Stopped(server.cut, server.dead)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server with this server's drain: /readyz says 503 at the first signal, a second one cuts; a dead
    engine stops it as a signal does, for its supervisor to start it again."""

    def __init__(self, config: uvicorn.Config, parts: ServerState, flights: _Flights) -> None:
        super().__init__(config)
        self.parts = parts
        self.flights = flights
        self.forced = False
        self.cut = 0
        self.dead: str | None = None

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick (every 0.1 s), which also watches the engine."""
        if self.dead is None and (dead := self.parts.engine.dead) is not None:
            self.dead = dead
            log.critical("The engine died (%s): the server stops so that its supervisor restarts it.", dead)
            self.should_exit = True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.forced = self.parts.draining  # a second signal
        self.parts.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop accepting, let running requests finish until drain_seconds or a second signal, cut the rest."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        seconds = self.parts.settings.drain_seconds
        if self.dead is not None:
            seconds = min(seconds, DEAD_DRAIN_SECONDS)
        if self.flights.running:
            log.info(
                "Draining: %d requests running; waiting up to %g s for them (--drain-seconds), "
                "a second signal cuts them now.",
                len(self.flights.running),
                seconds,
            )
        deadline = time.monotonic() + seconds
        while self.flights.running and not self.forced and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.flights.running:
            why = "a second stop signal came" if self.forced else f"its drain time of {seconds:g} s ran out"
            if self.dead is not None:
                why = f"its engine died ({self.dead})"
            self.cut = self.flights.cut(f"The server stopped before this request finished: {why}.")
            log.warning("Cut %d running requests with an error event or a 503: %s.", self.cut, why)
        deadline = time.monotonic() + 5  # the cut requests' last bytes, then their connections close
        while (self.flights.running or self.server_state.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.lifespan.shutdown()


async def _close(parts: ServerState) -> None:
    """Turn new generations away and stop the engine and the registry thread (requests have drained by now)."""
    parts.draining = True
    status = parts.engine.status()
    if status.running + status.waiting:
        log.warning("Stopping with %d generations still running.", status.running + status.waiting)
    await parts.engine.close()
    parts.catalog.close()


def _error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def _serve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    return _error(exc.status, exc.body(), exc.headers())


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    return await _serve_error(request, from_engine(exc))


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """A body that is not JSON or not the schema is a 400, as OpenAI answers, naming the field."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return _error(400, BadRequest(f"The body is not valid JSON: {first.get('ctx', {}).get('error', '')}.").body())
    field = ".".join(str(part) for part in first["loc"] if part != "body")
    if not field:  # curl -d without a JSON content type lands here
        return _error(400, BadRequest("The body must be a JSON object sent as Content-Type: application/json.").body())
    return _error(400, BadRequest(f"{field}: {first['msg']}", param=field).body())


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Routing errors (no such path, wrong method) in the same shape as every other error."""
    assert isinstance(exc, HTTPException)
    if isinstance(exc, _BodyTooLarge):
        return _error(exc.status_code, exc.error.body())
    body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None}}
    return _error(exc.status_code, body, exc.headers)


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    return _error(500, ServeError(f"Internal server error ({type(exc).__name__}); see the server log.").body())


class _BodyTooLarge(HTTPException):
    """A body over the limit, noticed while the app reads it: FastAPI lets only HTTPException through unchanged."""

    def __init__(self, error: PayloadTooLarge) -> None:
        super().__init__(error.status, str(error))
        self.error = error


@dataclass(eq=False)
class _Flight:
    """One request in progress: its task, and how far its response has gone."""

    task: asyncio.Task[Any]
    reason: str | None = None  # why the shutdown cut it
    started: bool = False
    streaming: bool = False
    finished: bool = False


class _Flights:
    """The requests in progress, so that a shutdown can cut those still running, each with an error."""

    def __init__(self) -> None:
        self.running: dict[asyncio.Task[Any], _Flight] = {}

    def cut(self, reason: str) -> int:
        """Cancel every running request; each answers REASON as a 503 or, streaming, as a last error event."""
        for flight in self.running.values():
            flight.reason = reason
            flight.task.cancel()
        return len(self.running)


class _Observe:
    """Gives each request an id (X-Request-ID), bounds its body, counts it in Prometheus and writes its log line."""

    def __init__(self, app: ASGIApp, flights: _Flights, max_body: int) -> None:
        self.app = app
        self.flights = flights
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started, status = time.perf_counter(), 500
        flight = _Flight(asyncio.current_task())  # type: ignore[arg-type]
        too_large = PayloadTooLarge(
            f"The request body is larger than this server's limit of {self.max_body} bytes (--max-body-bytes)."
        )
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:  # checked as it arrives: a huge body is never held whole
                raise _BodyTooLarge(too_large)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                flight.started = True
                flight.streaming = (
                    dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
                )
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                flight.finished = True
            await send(message)

        self.flights.running[flight.task] = flight
        try:
            if _content_length(scope) > self.max_body:  # refused before a byte of it is read
                await JSONResponse(too_large.body(), status_code=too_large.status)(scope, receive, send_with_id)
            else:
                await self.app(scope, bounded_receive, send_with_id)
        except asyncio.CancelledError:
            if flight.reason is None:
                raise
            flight.task.uncancel()
            await _cut(flight, send_with_id)
        finally:
            del self.flights.running[flight.task]
            status = state.get("status", status)  # a stream cut by its client says 499 here, its status line 200
            seconds = time.perf_counter() - started
            endpoint = getattr(scope.get("route"), "path", "other")  # route templates: bounded label values
            REQUESTS.labels(endpoint, str(status)).inc()
            REQUEST_SECONDS.labels(endpoint).observe(seconds)
            if status >= 400 and "model" in state:  # resolved, then failed: the console's live view shows it
                MODEL_ERRORS.labels(state["model"], state.get("tenant", "-")).inc()
            if endpoint not in _QUIET:
                log.info(
                    "request_id=%s %s %s tenant=%s model=%s status=%d prompt_tokens=%d completion_tokens=%d "
                    "seconds=%.3f",
                    request_id,
                    _field(scope["method"]),
                    _field(scope["path"]),
                    _field(state.get("tenant", "-")),
                    _field(state.get("model", "-")),
                    status,
                    state.get("prompt_tokens", 0),
                    state.get("completion_tokens", 0),
                    seconds,
                )


async def _cut(flight: _Flight, send: Send) -> None:
    """End a request the shutdown cancelled: a 503 if nothing was sent yet, else a last error event."""
    error = Unavailable(flight.reason or "The server stopped.")
    if not flight.started:
        await JSONResponse(error.body(), status_code=error.status)({"type": "http"}, _nothing, send)
    elif not flight.finished:
        event = sse(error.body()) if flight.streaming else ""
        await send({"type": "http.response.body", "body": event.encode(), "more_body": False})


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


def _content_length(scope: Scope) -> int:
    """The Content-Length the client announced (0 when absent or unreadable: the body is counted as it comes)."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _field(value: str) -> str:
    """VALUE as one log field: backslashes, spaces, control and non-ASCII characters escaped, so one line it stays."""
    return value.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")
