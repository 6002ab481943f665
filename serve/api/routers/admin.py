"""Operator endpoints: load and unload adapters, re-read the registry, see what is loaded (admin key); Prometheus
metrics (admin or metrics key)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapterctl.serve.api.dependencies import AdminDep, ServerDep, admin, scraper
from adapterctl.serve.errors import BadRequest, Unavailable
from adapterctl.serve.api.protocol import AdapterRequest

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin)])
# /metrics names every tenant and the adapter versions each uses: with tenants, it is for the operator's scraper.
scrape = APIRouter(tags=["health"], dependencies=[Depends(scraper)])


@scrape.get("/metrics")
async def prometheus() -> Response:
    """Prometheus metrics: requests, tokens, latency, time to first token, adapter loads and evictions, per adapter
    version and tenant, and the engine's queue (also under vLLM's names, for LoRA-aware routers)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.post("/load")
async def load(body: AdapterRequest, tenant: AdminDep, parts: ServerDep) -> dict[str, Any]:
    """Load an adapter version now (fetching its files if need be), ahead of its first request.

    `loaded` is true only when the version is in memory now; `already` says it was before this call.
    """
    spec = await parts.catalog.resolve(body.model, tenant.may_use)
    if spec is None:
        raise BadRequest("The base model is always loaded; name an adapter.", param="model")
    already = spec.key in await parts.engine.loaded()
    await parts.engine.load(spec)
    adapters = await parts.engine.loaded()
    if spec.key not in adapters:
        raise Unavailable(
            f"{spec.key} is read but not in memory: every place (--max-loaded) holds an adapter that running "
            "requests use. It is loaded when one frees; call again to see."
        )
    return {"model": spec.key, "loaded": True, "already": already, "adapters": adapters}


@router.post("/unload")
async def unload(body: AdapterRequest, tenant: AdminDep, parts: ServerDep) -> dict:
    """Drop an adapter version from memory once no request uses it."""
    version = parts.catalog.lookup(body.model, tenant.may_use)
    if version is None:
        raise BadRequest("The base model cannot be unloaded; name an adapter.", param="model")
    unloaded = await parts.engine.unload(version.ref)
    return {"model": version.ref, "unloaded": unloaded, "adapters": await parts.engine.loaded()}


@router.post("/refresh")
async def refresh(tenant: AdminDep, parts: ServerDep) -> dict[str, Any]:
    """Re-read the registry's versions and stages now, instead of at the next poll."""
    await asyncio.to_thread(parts.catalog.refresh)
    return {"adapters": {name: version.ref for name, version in parts.catalog.names(tenant.may_use).items()}}


@router.get("/loaded")
async def loaded(parts: ServerDep) -> dict[str, Any]:
    """The adapter versions in memory (least recently used first) and the generations running."""
    status = parts.engine.status()
    loaded = list(status.loaded)
    answer: dict[str, Any] = {"loaded": loaded, "running": status.running + status.waiting}
    if parts.catalog.fidelity is not None:  # each loaded adapter's fidelity class on this server's precision
        verdicts = {key: parts.catalog.fidelity.verdict(key) for key in loaded}
        answer["fidelity"] = {key: v.to_dict() for key, v in verdicts.items() if v is not None}
    return answer
