"""What a request's `model` means: an adapter version from the registry, its files on local disk, checked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from adapterctl.core.base import MARKER, linear_shapes
from adapterctl.core.cache import locked
from adapterctl.core.errors import AdaptersError, InvalidName, NotFound, first_line
from adapterctl.registry import folder
from adapterctl.registry.git import Tag
from adapterctl.registry.names import Ref, Version, check_name
from adapterctl.registry.refs import REGISTER_TAG, Adapter, AdapterVersion, State
from adapterctl.registry.repo import Registry
from adapterctl.registry.store import file_md5
from adapterctl.serve.engines.base import AdapterSpec
from adapterctl.serve.errors import AdapterNotFound, AdapterRejected, RegistryUnavailable, ServeError, Unavailable
from adapterctl.serve.catalog.fidelity import Fidelity

log = logging.getLogger("serve")


class Served(Protocol):
    """What the catalog needs of the engine it checks adapters for."""

    model_id: str
    fingerprint: str
    max_rank: int


class Catalog:
    """Resolves references against the registry's tags, which a background thread re-reads every INTERVAL seconds.

    STALE_AFTER: seconds the registry may stay unreadable before /readyz says so. SETTLE: seconds an adapter
    whose newest stage tag is an unassign keeps its previous view, while the assign that completes the
    promotion or rollback is on its way.
    """

    def __init__(
        self,
        registry: Registry,
        cache: Path,
        *,
        base_id: str,
        fingerprint: str,
        max_rank: int,
        interval: float = 0.5,
        stale_after: float = 10.0,
        settle: float = 5.0,
        fidelity: Fidelity | None = None,
        layers: Mapping[str, tuple[int, int]] | None = None,
        base_names: tuple[str, ...] = (),
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.base_id = base_id
        self.base_names = {base_id, *base_names}  # what a request may call the base: its id, Hub id, folder name
        self.fingerprint = fingerprint
        self.max_rank = max_rank
        self.interval = interval
        self.stale_after = stale_after
        self.settle = settle
        self.in_memory: Callable[[str], bool] = lambda key: False  # the app points this at the engine
        self._checked: dict[Path, AdapterSpec] = {}  # folders whose adapter passed `check`
        self._hashes: dict[Path, list[dict[str, str]]] = {}  # folder -> its files' md5s as the registry records them
        self._ignored: set[str] = set()  # malformed tags, warned about once
        self._half: dict[str, float] = {}  # adapter -> when its half-done stage change was first seen
        self._failure: str | None = None
        self._failing_since = 0.0
        self._lock = threading.Lock()
        self.fidelity = fidelity  # judges each adapter against the server's precision; None: not judged
        self.layers = layers  # the base's linear layers, module path -> (out, in) features; None: not checked
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state = State([])
        self.refresh()

    @classmethod
    def serving(cls, registry: Registry, cache: Path, base: Path, engine: Served, **options: Any) -> Catalog:
        """The catalog of a server whose ENGINE (or replicas' description) runs the base model folder BASE: adapters
        are checked against its weights' fingerprint, its linear layers' shapes and its largest rank."""
        return cls(
            registry,
            cache,
            base_id=engine.model_id,
            fingerprint=engine.fingerprint,
            max_rank=engine.max_rank,
            layers=linear_shapes(base),
            base_names=base_names(base),
            **options,
        )

    def start(self) -> None:
        """Follow the registry in a background thread, so promote and rollback reach running servers."""
        self._thread = threading.Thread(target=self._follow, name="catalog-refresh", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop following the registry."""
        self._stop.set()
        if self._thread:
            self._thread.join()

    def refresh(self) -> None:
        """Re-read the registry's tags now (one git call); RegistryUnavailable when it cannot be read."""
        with self._lock:
            try:
                state = self._read()
            except Exception as exc:  # a folder gone, git failing, anything: keep serving the last state read
                reason = first_line(exc)
                if reason != self._failure:  # once per distinct failure, not twice a second
                    log.warning("Cannot re-read the registry, serving what it held before: %s", reason)
                if self._failure is None:
                    self._failing_since = time.monotonic()
                self._failure = reason
                raise RegistryUnavailable(f"Cannot read the adapter registry: {self._public(reason)}") from None
            if self._failure is not None:
                log.warning("The registry is readable again.")
            self._failure = None
            self.state = self._settled(state)

    def unreadable(self) -> str | None:
        """Why the registry has not been readable for more than STALE_AFTER seconds, or None."""
        if self._failure is None or time.monotonic() - self._failing_since < self.stale_after:
            return None
        seconds = time.monotonic() - self._failing_since
        return f"The adapter registry has not been readable for {seconds:.0f} s: {self._public(self._failure)}"

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # refresh logged it; nothing may end this thread
                self.refresh()

    def _read(self) -> State:
        """The registry's state, read from its tags less those that merely look like ours."""
        return State([tag for tag in self.registry.git.tags() if self._usable(tag)])

    def _usable(self, tag: Tag) -> bool:
        """False, with one warning per tag, for a version tag that names no valid adapter or version."""
        if tag.name in self._ignored:
            return False
        match = REGISTER_TAG.fullmatch(tag.name)
        try:
            if match:
                check_name(match["name"])
                Version.parse(match["version"])
        except InvalidName as exc:  # `git tag -a alpha@v01.0.0` by hand, or another tool's tags
            self._ignored.add(tag.name)
            log.warning("Ignoring the tag %r, which is not a valid version tag: %s", tag.name, exc)
            return False
        return True

    def _settled(self, new: State) -> State:
        """NEW, but an adapter whose newest stage tag unassigns keeps its previous stages for up to SETTLE seconds.

        Promote and rollback unassign the previous holder, then assign the new one: between the two tags the
        stage has no holder and a bare name would fall back to the latest version, which nobody promoted.
        """
        now = time.monotonic()
        for name, adapter in new.adapters.items():
            if not adapter.events or adapter.events[-1].assign:
                self._half.pop(name, None)
                continue
            since = self._half.setdefault(name, now)
            before = self.state.adapters.get(name)
            if before is not None and now - since < self.settle:
                new.adapters[name] = Adapter(name, adapter.versions, before.events)
        return new

    def names(self, allowed: Callable[[str], bool]) -> dict[str, AdapterVersion]:
        """Each adapter the caller may use, with the version its bare name means now."""
        state = self.state
        return {name: state.resolve(Ref(name)) for name in state.adapters if allowed(name)}

    def lookup(self, model: str, allowed: Callable[[str], bool]) -> AdapterVersion | None:
        """The version MODEL means now, or None for the base model; another tenant's adapter is not found."""
        if model in self.base_names:
            return None
        missing = AdapterNotFound(f"The model {model!r} does not exist or you do not have access to it.")
        try:
            ref = Ref.parse(model)
        except InvalidName:
            raise missing from None
        state = self.state  # one snapshot: a refresh in between must not mix two registries' views
        if ref.name not in state.adapters or not allowed(ref.name):
            raise missing
        try:
            return state.resolve(ref)
        except NotFound as exc:
            raise AdapterNotFound(str(exc)) from None

    async def resolve(self, model: str, allowed: Callable[[str], bool]) -> AdapterSpec | None:
        """The checked adapter MODEL means now, its files fetched into the cache on first use; None for the base."""
        version = self.lookup(model, allowed)
        if version is None:
            return None
        spec = self._checked.get(self.folder(version))
        if spec is not None and self.in_memory(spec.key):
            return spec  # its files are not read again while it stays in memory
        return await asyncio.to_thread(self.materialize, version)

    def folder(self, version: AdapterVersion) -> Path:
        """Where VERSION's files live in the cache; the commit in the name keeps registries sharing a cache apart."""
        return self.cache / version.name / f"{version.version}-{version.commit[:12]}"

    def materialize(self, version: AdapterVersion) -> AdapterSpec:
        """VERSION's files in the cache, checked against the registry's hashes (fetched again if not), then checked."""
        path = self.folder(version)
        hashes = self._hashes.get(path)
        if hashes is None or self._damaged(path, hashes):
            # One writer at a time, across threads and processes; DVC's checkout writes a staging folder
            # and renames it, so a folder that exists is complete.
            with locked(self.cache / ".materialize.lock"):
                try:
                    self._fetch(version, path)
                except ServeError:
                    raise
                except Exception as exc:  # a request fails, never the server: whatever the registry holds
                    if not isinstance(exc, (AdaptersError, OSError)):
                        log.exception("Fetching the files of %s failed.", version.ref)
                    raise self._unfetchable(version, exc) from None
        spec = AdapterSpec(version.name, str(version.version), path, version.commit)
        self.check(spec)
        self._checked[path] = spec
        return spec

    def _fetch(self, version: AdapterVersion, path: Path) -> None:
        """Make PATH hold exactly VERSION's files: a missing, truncated or altered one means a fresh copy."""
        hashes = self._hashes.get(path)
        if hashes is None:
            hashes = self._hashes[path] = self.registry.files(version)[0]
        damaged = self._damaged(path, hashes) if path.is_dir() else None
        if path.is_dir() and not damaged:
            return
        if damaged:
            log.warning("%s: %s in the cache at %s; fetching a fresh copy.", version.ref, "; ".join(damaged), path)
            broken = path.with_name(f".{path.name}.broken")
            shutil.rmtree(broken, ignore_errors=True)
            path.rename(broken)  # a request reading the old files keeps its open handles
            shutil.rmtree(broken, ignore_errors=True)
        self.registry.checkout(version, path)
        damaged = self._damaged(path, hashes)
        if damaged:
            raise AdapterRejected(
                f"{version.ref} cannot be served: its files do not match the registry's hashes even when fetched "
                f"again ({'; '.join(damaged)})."
            )

    @staticmethod
    def _damaged(path: Path, hashes: list[dict[str, str]]) -> list[str]:
        """What is wrong with the files at PATH against HASHES: one phrase per missing or altered file."""
        damaged = []
        for entry in hashes:
            try:
                if file_md5(path / entry["relpath"]) != entry["md5"]:
                    damaged.append(f"{entry['relpath']} does not match its md5 {entry['md5']}")
            except OSError:
                damaged.append(f"{entry['relpath']} is missing")
        return damaged

    def _unfetchable(self, version: AdapterVersion, exc: Exception) -> ServeError:
        """The answer to a request whose files cannot be had: 503 while the registry is unreadable, else 422."""
        reason = self._public(first_line(exc))
        if isinstance(exc, OSError):
            return Unavailable(f"The files of {version.ref} cannot be read now ({reason}); try again later.")
        return AdapterRejected(f"{version.ref} cannot be served: {reason}")

    def _public(self, message: str) -> str:
        """MESSAGE without this server's folders, which mean nothing to a client."""
        for where, name in ((self.cache, "the server's cache"), (self.registry.root, "the registry")):
            message = message.replace(f"{where}/", "").replace(str(where), name)
        return message

    def check(self, spec: AdapterSpec) -> None:
        """Refuse an adapter this server cannot apply: safetensors only, the same base weights, rank in bounds."""
        try:
            summary = folder.check(spec.path)
        except folder.InvalidAdapter as exc:
            reason = str(exc).replace(f"{spec.path}/", "")  # the cache's paths mean nothing to a client
            raise AdapterRejected(f"{spec.key} cannot be served: {reason}") from None
        if summary["base_fingerprint"] != self.fingerprint:
            raise AdapterRejected(
                f"{spec.key} was trained on other base weights: its lineage.json records "
                f"{summary['base_fingerprint']}, this server runs {self.fingerprint}."
            )
        if summary["rank"] > self.max_rank:
            raise AdapterRejected(
                f"{spec.key} has LoRA rank {summary['rank']}, above this server's maximum of {self.max_rank} "
                "(--max-rank)."
            )
        if self.layers is not None:
            self._fits(spec)
        if self.fidelity is not None:
            self.fidelity.admit(spec.key, summary)

    def _fits(self, spec: AdapterSpec) -> None:
        """Refuse an adapter whose LoRA pairs name modules the base lacks or do not fit their layers' shapes."""
        assert self.layers is not None
        tensors, _ = folder.safetensors_header(spec.path / folder.WEIGHTS)
        pairs: dict[str, dict[str, list[int]]] = {}
        for name, tensor in tensors.items():
            if match := folder.LORA_KEY.match(name):
                pairs.setdefault(match["module"], {})[match["part"]] = tensor["shape"]
        for module, pair in sorted(pairs.items()):
            layer = self.layers.get(module)
            if layer is None:
                raise AdapterRejected(
                    f"{spec.key} cannot be served: it adapts {module}, a module this server's base model lacks."
                )
            (out, inner), a, b = layer, pair["A"], pair["B"]
            if a[1] != inner or b[0] != out:
                raise AdapterRejected(
                    f"{spec.key} cannot be served: its LoRA pair of {module} (A {a}, B {b}) does not fit that layer of "
                    f"this server's base model ({inner} in, {out} out)."
                )


def base_names(base: Path) -> tuple[str, ...]:
    """The names a client may give the base model folder BASE: its folder name and the Hub id it came from."""
    marker = base / MARKER
    hub_id = json.loads(marker.read_text()).get("hub_id") if marker.is_file() else None
    return (base.name, hub_id) if hub_id else (base.name,)
