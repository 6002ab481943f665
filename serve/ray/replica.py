"""One engine replica behind Ray Serve: a real engine, adapters fetched from the registry's remotes on demand.

Ray Serve's model multiplexing routes each request by its exact adapter version (`name@vX.Y.Z`) to a replica
that holds it and evicts the least recently used one; this replica's loader fetches that version from the
registry's git + DVC remotes into its own cache, checks it as the server's catalog does, and installs it.
Errors travel back as `Failed` records, not exceptions, so nothing depends on how Ray pickles them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray import serve

from adapterctl.core.cache import home, locked
from adapterctl.registry.git import Git
from adapterctl.registry.repo import Registry
from adapterctl.serve.catalog.versions import Catalog
from adapterctl.serve.engines.base import (
    AdapterLoadFailed,
    AdapterSpec,
    Chunk,
    EngineError,
    EngineStatus,
    EngineUnavailable,
    GenerateRequest,
    GenerationFailed,
    InvalidRequest,
)
from adapterctl.serve.errors import ServeError, Unavailable
from adapterctl.serve.engines.factory import EngineOptions, build

log = logging.getLogger("serve")
STATUS_SECONDS = 0.2  # how often a replica reports its status to the board
STALE_SECONDS = 5.0  # a replica silent this long is gone from the board (dead, or being restarted)


@dataclass(frozen=True)
class Routed:
    """Which replica took a request, and whether it had to load the request's adapter for it."""

    replica: str
    cold: bool


@dataclass(frozen=True)
class Failed:
    """An engine error of one request, as a plain record: the ingress raises it again as the same error."""

    kind: str  # the EngineError class name
    message: str
    param: str | None = None

    @classmethod
    def of(cls, exc: BaseException, key: str | None) -> Failed:
        if isinstance(exc, InvalidRequest):
            return cls("InvalidRequest", str(exc), exc.param)
        if isinstance(exc, AdapterLoadFailed):
            return cls("AdapterLoadFailed", exc.reason, exc.key)
        if isinstance(exc, ServeError):  # the replica's catalog refused the files: the adapter cannot be served
            kind = "EngineUnavailable" if isinstance(exc, Unavailable) else "AdapterLoadFailed"
            message = str(exc).removeprefix(f"{key} cannot be served: ") if key else str(exc)
            return cls(kind, message, key)
        if isinstance(exc, EngineError):
            return cls(type(exc).__name__, str(exc))
        return cls("GenerationFailed", f"The engine failed on this request ({type(exc).__name__}: {exc}).")

    def error(self) -> EngineError:
        """The engine error this record stands for."""
        if self.kind == "InvalidRequest":
            return InvalidRequest(self.message, self.param)
        if self.kind == "AdapterLoadFailed":
            return AdapterLoadFailed(self.param or "the adapter", self.message)
        if self.kind == "EngineUnavailable":
            return EngineUnavailable(self.message)
        return GenerationFailed(self.message)


@dataclass(frozen=True)
class EngineDescription:
    """What the ingress needs to know of the replicas' engine to check requests before routing them."""

    model_id: str
    fingerprint: str
    precision: Any
    context_length: int
    vocab_size: int
    prompt_characters: int
    max_rank: int
    max_loaded: int
    max_batch: int | None = None  # generations one replica runs at once
    max_batched_tokens: int | None = None  # prompt tokens one replica's step prefills


@ray.remote(num_cpus=0)
class StatusBoard:
    """Each live replica's latest status, which the ingress reads for /metrics and the catalog."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[float, int, EngineStatus]] = {}

    def put(self, replica: str, pid: int, status: EngineStatus) -> None:
        self.rows[replica] = (time.time(), pid, status)

    def read(self) -> dict[str, tuple[int, EngineStatus]]:
        """replica -> (its process id, its status), for replicas heard from within STALE_SECONDS."""
        now = time.time()
        self.rows = {k: row for k, row in self.rows.items() if now - row[0] < STALE_SECONDS}
        return {replica: (pid, status) for replica, (_, pid, status) in self.rows.items()}


class RemoteAdapters:
    """Adapter versions fetched from the registry's git + DVC remote URL into this machine's cache, checked.

    One clone of the remote per machine (its tags fetched again when a version is not known yet); files are
    materialized and verified by the same catalog code as a single server's.
    """

    def __init__(self, url: str, branch: str, base: Path, description: EngineDescription) -> None:
        self.url = url
        folder = replica_home(url)
        root = folder / "registry"
        self._lock = folder / ".git.lock"
        with locked(self._lock):
            if not (root / ".dvc").is_dir():  # none yet, or one cloned on a remote HEAD that is not the registry's
                shutil.rmtree(root, ignore_errors=True)
                staging = folder / f".clone-{os.getpid()}"
                shutil.rmtree(staging, ignore_errors=True)
                # The registry's own branch: a bare remote's HEAD may name another (master) or none.
                _git(folder, "clone", "--quiet", "--branch", branch, url, str(staging))
                staging.rename(root)
        self.catalog = Catalog.serving(Registry(root), folder / "files", base, description)

    def fetch(self, spec: AdapterSpec) -> AdapterSpec:
        """SPEC's exact version (its name, version and commit) in this machine's cache, its files verified."""
        version = self._known(spec)
        if version is None:
            with locked(self._lock):
                _git(self.catalog.registry.root, "fetch", "--quiet", "--force", "origin", "+refs/tags/*:refs/tags/*")
            version = self._known(spec)
        if version is None:
            raise AdapterLoadFailed(
                spec.key, "its version tag is not on the registry's remote; publish it with `adapters push`"
            )
        if spec.commit and version.commit != spec.commit:
            raise AdapterLoadFailed(
                spec.key, "the registry's remote tags another commit with this version; run `adapters pull` and push"
            )
        return self.catalog.materialize(version)

    def _known(self, spec: AdapterSpec) -> Any:
        self.catalog.refresh()
        with contextlib.suppress(ServeError):
            return self.catalog.lookup(spec.key, lambda name: True)
        return None


def replica_home(url: str) -> Path:
    """Where the replicas of this machine keep their clone of the registry at URL and its adapters' files."""
    return home() / "replicas" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _git(cwd: Path, *args: str) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = Git(cwd).attempt(*args)  # as the registry runs git: no hook of the user's
    if proc.returncode != 0:
        reason = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        raise OSError(f"git {args[0]} of the registry's remote failed: {reason}")


class _Held:
    """One adapter version held in Ray Serve's multiplexing cache; dropping it unloads it from the engine."""

    def __init__(self, spec: AdapterSpec, replica: EngineReplica) -> None:
        self.spec = spec
        self._replica = replica
        self._loop = asyncio.get_running_loop()
        self._dropped = False

    def __del__(self) -> None:
        # Called once by Ray's LRU eviction (in a thread) and again by the garbage collector: unload once.
        if self._dropped:
            return
        self._dropped = True
        engine, key = self._replica.engine, self.spec.key
        with contextlib.suppress(RuntimeError):  # the loop is closed: the replica is stopping anyway
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(engine.unload(key)))


class EngineReplica:
    """A Ray Serve replica: a real engine (`serve.engines.factory`) whose adapters come from the registry's remotes."""

    def __init__(
        self, base: str | None, options: EngineOptions, remote: str, branch: str, threads: int, board: Any
    ) -> None:
        import torch

        from adapterctl.core.base import resolve_base

        torch.set_num_threads(threads)  # one team of threads per replica: replicas on one machine share its cores
        model = resolve_base(base)
        self.engine = build(model.path, model.hub_id or model.path.name, options)
        engine = self.engine
        self.description = EngineDescription(
            engine.model_id,
            engine.fingerprint,
            engine.precision,
            engine.context_length,
            engine.vocab_size,
            engine.prompt_characters,
            engine.max_rank,
            engine.max_loaded,
            engine.max_batch,
            engine.max_batched_tokens,
        )
        self.adapters = RemoteAdapters(remote, branch, model.path, self.description)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._wanted: dict[str, AdapterSpec] = {}
        self._board = board
        self._stop = threading.Event()
        threading.Thread(target=self._report, name="replica-status", daemon=True).start()

    def _report(self) -> None:
        """Tell the board this replica's status a few times a second, until it stops."""
        while not self._stop.wait(STATUS_SECONDS):
            self._tell()

    def _tell(self) -> None:
        with contextlib.suppress(Exception):  # the board restarting: the next report tells it again
            self._board.put.remote(self.replica, os.getpid(), self.engine.status())

    def check_health(self) -> None:
        """Ray Serve's periodic probe: an engine that can serve nothing more fails it, so Ray replaces the replica."""
        if self.engine.dead is not None:
            raise RuntimeError(f"The engine cannot serve any more: {self.engine.dead}.")

    async def describe(self) -> EngineDescription:
        """The engine's model, limits and precision."""
        return self.description

    async def _adapter(self, key: str) -> _Held:
        """Ray Serve's multiplexed loader (wrapped in `replica_class`): fetch, check and install one version."""
        spec = await asyncio.to_thread(self.adapters.fetch, self._wanted[key])
        await self.engine.load(spec)
        return _Held(spec, self)

    async def _use(self, spec: AdapterSpec) -> tuple[AdapterSpec, bool]:
        """SPEC's local copy here, loaded; and whether it was loaded for this request."""
        self._wanted[spec.key] = spec
        cold = spec.key not in self.engine.status().loaded
        held = await self._adapter_cached(spec.key)  # type: ignore[attr-defined]
        return held.spec, cold

    async def load(self, spec: AdapterSpec) -> Routed | Failed:
        """Have SPEC's version in this replica's engine."""
        try:
            _, cold = await self._use(spec)
        except Exception as exc:
            return Failed.of(exc, spec.key)
        self._tell()  # sent before the answer: the ingress's next read of the board lists the version
        return Routed(self.replica, cold)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Routed | Chunk | Failed]:
        """Which replica runs REQUEST, then its chunks; an engine error ends it as a Failed record."""
        cold = False
        try:
            if request.adapter is not None:
                local, cold = await self._use(request.adapter)
                request = replace(request, adapter=local)
            yield Routed(self.replica, cold)
            async for chunk in self.engine.generate(request):
                yield chunk
        except Exception as exc:
            yield Failed.of(exc, request.adapter.key if request.adapter else None)

    async def unload(self, key: str) -> bool:
        """Drop an adapter version from this replica's engine, and from Ray's table of what it holds."""
        unloaded = await self.engine.unload(key)
        if unloaded:
            # Ray Serve 2.60 keeps its multiplexing cache here; it offers no call to drop one model.
            wrapper = getattr(self, "__serve_multiplex_wrapper", None)
            if wrapper is not None and wrapper.models.pop(key, None) is not None:
                wrapper._push_multiplexed_replica_info = True
        self._tell()
        return unloaded

    def __del__(self) -> None:
        self._stop.set()


def replica_class(max_loaded: int) -> type[EngineReplica]:
    """EngineReplica with Ray Serve's multiplexed loader keeping MAX_LOADED versions (the engine's own LRU size)."""

    class Replica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=max_loaded)
        async def _adapter_cached(self, key: str) -> _Held:
            return await self._adapter(key)

    Replica.__name__ = Replica.__qualname__ = "EngineReplica"
    return Replica


def unavailable(exc: BaseException) -> EngineUnavailable:
    """A replica lost while it ran a request, as the engine error the client gets (a 503)."""
    return EngineUnavailable(
        f"The engine replica running this request stopped ({type(exc).__name__}); Ray restarts it: send the "
        "request again."
    )
