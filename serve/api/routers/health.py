"""Probes and metrics: liveness (false once the engine died), readiness (false while draining or blind to registry or
keys), Prometheus."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapterctl.serve.api.dependencies import ServerDep
from adapterctl.serve.engines.base import Engine, EngineDead
from adapterctl.serve.errors import Unavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(parts: ServerDep) -> dict[str, str]:
    """The process answers and its engine lives; 503 once the engine died (the server is exiting)."""
    alive(parts.engine)
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(parts: ServerDep) -> dict[str, str]:
    """The model is loaded and the server takes requests; 503 while it drains, or cannot read its registry or keys, or
    once its engine died."""
    alive(parts.engine)
    if parts.draining:
        raise Unavailable("The server is draining: it finishes running requests and takes no new ones.")
    problem = parts.catalog.unreadable() or parts.tenants.problem()
    if problem:
        raise Unavailable(problem)
    return {"status": "ready", "model": parts.engine.model_id}


def alive(engine: Engine) -> None:
    """Raise EngineDead (a 503) once ENGINE can serve nothing more."""
    if (dead := engine.dead) is not None:
        raise EngineDead(dead)


@router.get("/metrics")
async def metrics(parts: ServerDep) -> Response:
    """Prometheus metrics: requests, tokens, latency, time to first token, adapter loads and evictions, per adapter
    version and tenant, and the engine's queue (also under vLLM's names, for LoRA-aware routers)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
