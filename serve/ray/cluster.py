"""`adapters serve --replicas N`: our FastAPI app as the Ray Serve ingress, N engine replicas behind it.

The ingress runs on the machine of `adapters serve` (it reads the registry folder there and resolves each
request's reference to an exact version); the replicas run wherever Ray places them and fetch adapters from the
registry's remotes. A local Ray cluster is started and stopped with the server unless `--ray-address` names one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve

from adapterctl.core.errors import NotFound
from adapterctl.registry import store
from adapterctl.registry.repo import Registry
from adapterctl.registry.remotes import resolve_remote
from adapterctl.serve.api.dependencies import Settings
from adapterctl.serve.engines.factory import EngineOptions, ServeOptionError
from adapterctl.serve.ray.replica import StatusBoard, replica_class

log = logging.getLogger("serve")
APP = "adapters"  # the Ray Serve application's name
NAMESPACE = "adapters"  # the Ray namespace of the replicas' status board


@dataclass(frozen=True)
class ReplicaConfig:
    """What `adapters serve --replicas` runs: the engine replicas and the app in front of them."""

    replicas: int
    threads: int  # torch threads per replica
    base: str | None
    options: EngineOptions
    registry: Path  # the registry folder the ingress follows
    remote: str  # the registry's git remote URL, which replicas clone and fetch versions from
    branch: str  # the registry's branch, which replicas check out whatever the remote's HEAD names
    tenants_file: Path | None
    settings: Settings
    stale_after: float = 10.0
    strict_fidelity: bool = False
    interval: float = 0.5  # seconds between reads of the registry's tags (promote and rollback reach routing)
    affinity: bool = True  # route each request by its adapter version; False: anywhere (for comparison)


@serve.ingress()
class Ingress:
    """The Ray Serve ingress: this server's own FastAPI app, over a RayEngine routing to the replicas."""

    def __init__(self, replicas: Any, board: Any, config: ReplicaConfig) -> None:
        self.replicas = replicas
        self.board = board
        self.config = config

    async def __serve_build_asgi_app__(self) -> FastAPI:
        from adapterctl.core.base import resolve_base
        from adapterctl.serve.api.tenants import Tenants
        from adapterctl.serve.ray.engine import RayEngine
        from adapterctl.serve.server import build_app

        config = self.config
        logging.getLogger("serve").setLevel(logging.INFO)
        description = await self.replicas.describe.remote()
        base = resolve_base(config.base).path
        engine = RayEngine(self.replicas, self.board, base, description, config.replicas, config.affinity)
        return build_app(
            engine,
            base,
            Registry(config.registry),
            Tenants(config.tenants_file),
            config.settings,
            stale_after=config.stale_after,
            strict_fidelity=config.strict_fidelity,
            interval=config.interval,
        )


def remote_url(registry: Registry) -> str:
    """The git URL of the registry's remote (DVC's default, else origin), which replicas fetch adapters from."""
    try:
        name = resolve_remote(registry, None)
    except NotFound:
        raise ServeOptionError(
            f"Replicas fetch adapters from the registry's remote, and {registry.root} has none; add one with "
            "`adapters remote add origin URL` and publish with `adapters push`."
        ) from None
    url = registry.git.run("remote", "get-url", name).strip()
    path = store.local_path(url)
    return str((registry.root / path).resolve()) if path else url


def application(config: ReplicaConfig) -> Any:
    """The Ray Serve application: the ingress on this machine, CONFIG.replicas engine replicas anywhere."""
    board = StatusBoard.options(name=f"{APP}-board", namespace=NAMESPACE, get_if_exists=True).remote()
    threads = config.threads
    replica = serve.deployment(
        replica_class(config.options.max_loaded),
        name="EngineReplica",
        num_replicas=config.replicas,
        max_ongoing_requests=4 * config.options.max_batch,  # beyond a few batches' worth, requests wait in routing
        ray_actor_options={"num_cpus": threads, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}},
    )
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        num_replicas=1,
        max_ongoing_requests=10_000,  # admission is the tenants' limits, not Ray's
        graceful_shutdown_timeout_s=config.settings.drain_seconds,
        ray_actor_options={"num_cpus": 0, "resources": {f"node:{ray.util.get_node_ip_address()}": 0.001}},
    )
    replicas = replica.bind(config.base, config.options, config.remote, config.branch, threads, board)
    return ingress.bind(replicas, board, config)


def start(address: str | None, host: str, port: int, cpus: int) -> str:
    """Join the Ray cluster at ADDRESS (None: start a local one with CPUS) and Serve's HTTP proxy; returns its URL.

    A cluster whose Serve already runs keeps its proxy's address, whatever HOST and PORT say.
    """
    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    if address is None:
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            logging_level=logging.WARNING,
            namespace=NAMESPACE,
        )
    else:
        ray.init(address=address, logging_level=logging.WARNING, namespace=NAMESPACE)
    serve.start(http_options={"host": host, "port": port})
    proxy = serve.context._get_global_client().http_config  # Ray Serve 2.60 says where its proxy listens only here
    return f"http://{proxy.host}:{proxy.port}"


def deploy(config: ReplicaConfig) -> None:
    """Run the application (replacing one of the same name) and wait until every replica is up."""
    serve.run(application(config), name=APP, route_prefix="/")


def stop(local: bool) -> None:
    """Delete the application, letting running requests finish; stop the local cluster if this process started it."""
    serve.delete(APP)
    if local:
        serve.shutdown()
        ray.shutdown()


def serve_until_signal(
    config: ReplicaConfig, address: str | None, host: str, port: int, announce: Callable[[str], None]
) -> None:
    """Start (or join) Ray, deploy CONFIG, ANNOUNCE its URL, serve until SIGTERM or SIGINT, then stop."""
    cpus = max(os.cpu_count() or 1, config.replicas * config.threads)
    url = start(address, host, port, cpus)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        deploy(config)
        announce(url)
        stopping.wait()
    finally:
        stop(address is None)
