"""The console at /ui: registry pages, a playground and live figures, served from templates and files in this
package (no CDN), behind strict security headers."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterctl.registry.repo import Registry
from adapterctl.serve.errors import ServeError
from adapterctl.serve.api.tenants import Tenants
from adapterctl.serve.ui.routes import TEMPLATES, Console, router

__all__ = ["Console", "browse_app", "install"]
STATIC = Path(__file__).parent / "static"
# Scripts and styles from this server only, never inline; the loss curve is a data: image inside its page.
HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
     b"form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]  # fmt: skip


def install(app: FastAPI, console: Console) -> None:
    """Serve the console of CONSOLE at /ui on APP."""
    app.state.console = console
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    app.add_middleware(_Headers)
    # The first page of a large registry would wait for every tag to be read: read them now, while nobody waits.
    threading.Thread(target=_warm, args=(console,), name="console-warm", daemon=True).start()


def _warm(console: Console) -> None:
    """Read the registry's state and compile the templates ahead of the first page; a failure is the page's to say."""
    with contextlib.suppress(Exception):
        console.pages.state()
        for name in TEMPLATES.env.list_templates():
            TEMPLATES.get_template(name)


def browse_app(registry: Registry, tenants: Tenants) -> FastAPI:
    """A console on REGISTRY alone, without a model: browsing, diffs, promote and rollback; no playground."""
    app = FastAPI(title="adapters console", docs_url=None, redoc_url=None, openapi_url=None)
    install(app, Console(registry, tenants))
    app.add_exception_handler(ServeError, _serve_error)
    return app


async def _serve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


class _Headers:
    """Adds the console's security headers to every answer under /ui."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/ui"):
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)
