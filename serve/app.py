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
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import docs
from serve.catalog import Catalog
from serve.dependencies import Server, Settings
from serve.engine import Engine
from serve.errors import BadRequest, ServeError
from serve.metrics import REQUEST_SECONDS, REQUESTS
from serve.routers import admin, health, openai, vllm
from serve.tenants import Tenants

log = logging.getLogger("serve")
_QUIET = {"/healthz", "/readyz", "/health", "/metrics"}  # probes and scrapes: counted, not logged


def create_app(engine: Engine, catalog: Catalog, tenants: Tenants, settings: Settings) -> FastAPI:
    """An app serving ENGINE's base model and CATALOG's adapters to TENANTS."""
    parts = Server(engine, catalog, tenants, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        catalog.start()
        try:
            yield
        finally:
            await _drain(parts)

    app = FastAPI(
        title="adapters",
        summary="One base model, many LoRA adapters per request, through an OpenAI-compatible API.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served from packaged assets by serve.docs
        redoc_url=None,
    )
    app.state.server = parts
    docs.install(app)
    for router in (openai.router, admin.router, health.router, vllm.router):
        app.include_router(router)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)
    app.add_middleware(_Observe)
    return app


def run(app: FastAPI, listener: socket.socket) -> None:
    """Serve APP on LISTENER until SIGTERM or SIGINT, then drain: running requests (streams too) finish first."""
    parts: Server = app.state.server
    config = uvicorn.Config(
        app, log_config=None, access_log=False, timeout_graceful_shutdown=int(parts.settings.drain_seconds)
    )
    # uvicorn raises the signal it drained on once more after shutting down; handled by then, the exit is 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    _Uvicorn(config, parts).run(sockets=[listener])


class _Uvicorn(uvicorn.Server):
    """uvicorn's server that marks the app draining the moment a stop signal arrives (so /readyz says 503)."""

    def __init__(self, config: uvicorn.Config, parts: Server) -> None:
        super().__init__(config)
        self.parts = parts

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.parts.draining = True
        super().handle_exit(sig, frame)


async def _drain(parts: Server) -> None:
    """Turn new generations away, let running ones finish (up to drain_seconds), then stop the engine."""
    parts.draining = True
    deadline = time.monotonic() + parts.settings.drain_seconds
    while parts.engine.running() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if parts.engine.running():
        log.warning(
            "Stopping with %d generations still running after %.0f s.",
            parts.engine.running(),
            parts.settings.drain_seconds,
        )
    parts.engine.close()
    parts.catalog.close()


def _error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def _serve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    return _error(exc.status, exc.body())


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
    body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None}}
    return _error(exc.status_code, body, exc.headers)


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    return _error(500, ServeError(f"Internal server error ({type(exc).__name__}); see the server log.").body())


class _Observe:
    """Gives each request an id (X-Request-ID), counts it in Prometheus and writes its one log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started, status = time.perf_counter(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            status = state.get("status", status)  # a stream cut by its client says 499 here, its status line 200
            seconds = time.perf_counter() - started
            endpoint = getattr(scope.get("route"), "path", "other")  # route templates: bounded label values
            REQUESTS.labels(endpoint, str(status)).inc()
            REQUEST_SECONDS.labels(endpoint).observe(seconds)
            if endpoint not in _QUIET:
                log.info(
                    "request_id=%s %s %s tenant=%s model=%s status=%d prompt_tokens=%d completion_tokens=%d "
                    "seconds=%.3f",
                    request_id,
                    scope["method"],
                    scope["path"],
                    state.get("tenant", "-"),
                    state.get("model", "-"),
                    status,
                    state.get("prompt_tokens", 0),
                    state.get("completion_tokens", 0),
                    seconds,
                )
