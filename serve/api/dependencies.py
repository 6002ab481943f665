"""What route handlers receive: the server's parts, the calling tenant, the admin and metrics checks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adapterctl.serve.catalog.versions import Catalog
from adapterctl.serve.engines.base import Engine
from adapterctl.serve.errors import Forbidden
from adapterctl.serve.engines.fairness import FairShare
from adapterctl.serve.api.tenants import Limiter, Tenant, Tenants


@dataclass(frozen=True)
class Settings:
    """Server-wide limits."""

    max_tokens_cap: int = 2048
    """Most tokens one request may generate (a tenant's own max_tokens can only lower it)."""
    drain_seconds: float = 120.0
    """On shutdown, how long running requests may take to finish before they are cut with an error."""
    max_body_bytes: int = 4 * 1024 * 1024
    """The largest request body read; a larger one is a 413 before it is parsed."""
    max_prompts: int = 2048
    """Most prompts in one completions request's list (OpenAI's limit); more is a 400."""
    max_prompt_logprobs: int = 262_144
    """Most prompt log-probabilities one echo + logprobs request returns: prompt tokens x generations x
    (logprobs + 1); more is a 400 (about 9 MB of JSON)."""


@dataclass
class ServerState:
    """The parts one app serves with; `draining` turns new generations away while shutting down."""

    engine: Engine
    catalog: Catalog
    tenants: Tenants
    settings: Settings
    limiter: Limiter = field(default_factory=Limiter)
    started: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    fairness: FairShare = field(init=False)

    def __post_init__(self) -> None:
        # Open mode has one caller, whose fair order is its arrival order: the engine's own queue keeps that.
        self.fairness = FairShare(self.engine, None if self.tenants.open else self.engine.max_batch)


_bearer = HTTPBearer(auto_error=False, description="An API key from the tenants file (none in open mode).")


def server(request: Request) -> ServerState:
    """The server this app was created with."""
    return request.app.state.server


ServerDep = Annotated[ServerState, Depends(server)]


def caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)], parts: ServerDep
) -> Tenant:
    """The tenant whose key the request carries (Unauthorized without a valid one); noted for the request log."""
    return tenant_of(request, credentials, parts.tenants)


def tenant_of(request: Request, credentials: HTTPAuthorizationCredentials | None, tenants: Tenants) -> Tenant:
    """The tenant of TENANTS whose key the request carries (Unauthorized without a valid one), noted for its log."""
    tenant = tenants.authenticate(credentials.credentials if credentials else None)
    request.state.tenant = tenant.name
    return tenant


CallerDep = Annotated[Tenant, Depends(caller)]


def admin(tenant: CallerDep) -> Tenant:
    """The caller, if it holds the admin key (any caller in open mode)."""
    if not tenant.admin:
        raise Forbidden("This endpoint needs the admin key.")
    return tenant


AdminDep = Annotated[Tenant, Depends(admin)]


def scraper(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)], parts: ServerDep) -> None:
    """Let the request read /metrics: with tenants, only the admin or the metrics key may (it names every tenant)."""
    parts.tenants.scraper(credentials.credentials if credentials else None)
