"""The server: an engine, the registry's adapters checked against its base, and the HTTP API in front of them.

`adapters serve` builds it around the engine it loads; under `--replicas` the Ray ingress builds the same server
around an engine that routes to the replicas.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from adapterctl.core.cache import home
from adapterctl.registry.repo import Registry
from adapterctl.serve.api.app import create_app
from adapterctl.serve.api.dependencies import Settings
from adapterctl.serve.api.tenants import Tenants
from adapterctl.serve.catalog.fidelity import Fidelity
from adapterctl.serve.catalog.versions import Catalog
from adapterctl.serve.engines.base import Engine


def build_app(
    engine: Engine,
    base: Path,
    registry: Registry,
    tenants: Tenants,
    settings: Settings,
    *,
    stale_after: float = 10.0,
    strict_fidelity: bool = False,
    interval: float = 0.5,
) -> FastAPI:
    """The app serving ENGINE's base model (its folder BASE) and REGISTRY's adapters to TENANTS.

    Adapters are checked against BASE and judged against the engine's precision (refused if STRICT_FIDELITY and
    not measured to keep their effect); the registry is re-read every INTERVAL seconds, and /readyz says 503 once
    it has been unreadable for STALE_AFTER seconds.
    """
    catalog = Catalog.serving(
        registry,
        home() / "serve",  # adapters' files, materialized once for every server of this user
        base,
        engine,
        interval=interval,
        stale_after=stale_after,
        fidelity=Fidelity(engine.precision, strict=strict_fidelity),
    )
    return create_app(engine, catalog, tenants, settings)
