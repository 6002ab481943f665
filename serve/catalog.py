"""What a request's `model` means: an adapter version from the registry, its files on local disk, checked."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from registry import folder
from core.errors import AdaptersError, InvalidName, NotFound
from registry.names import Ref
from registry.refs import AdapterVersion, State
from registry.repo import Registry
from serve.engine import AdapterSpec
from serve.errors import AdapterNotFound, AdapterRejected, ServeError
from serve.fidelity import Fidelity
from core.cache import locked

log = logging.getLogger("serve")


class Catalog:
    """Resolves references against the registry's tags, which a background thread re-reads every INTERVAL seconds."""

    def __init__(
        self,
        registry: Registry,
        cache: Path,
        *,
        base_id: str,
        fingerprint: str,
        max_rank: int,
        interval: float = 0.5,
        fidelity: Fidelity | None = None,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.base_id = base_id
        self.fingerprint = fingerprint
        self.max_rank = max_rank
        self.interval = interval
        self.fidelity = fidelity  # judges each adapter against the server's precision; None: not judged
        self.state: State = registry.state()
        self._checked: dict[Path, AdapterSpec] = {}  # folders already validated; a version's files never change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        """Re-read the registry's tags now (one git call)."""
        self.state = self.registry.state()

    def _follow(self) -> None:
        failing = None
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
                failing = None
            except AdaptersError as exc:  # keep serving the last state read; say so once per distinct failure
                if str(exc) != failing:
                    log.warning("Cannot re-read the registry, serving what it held before: %s", exc)
                failing = str(exc)

    def names(self, allowed: Callable[[str], bool]) -> dict[str, AdapterVersion]:
        """Each adapter the caller may use, with the version its bare name means now."""
        state = self.state
        return {name: state.resolve(Ref(name)) for name in state.adapters if allowed(name)}

    def lookup(self, model: str, allowed: Callable[[str], bool]) -> AdapterVersion | None:
        """The version MODEL means now, or None for the base model; another tenant's adapter is not found."""
        if model == self.base_id:
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
        return spec or await asyncio.to_thread(self.materialize, version)

    def folder(self, version: AdapterVersion) -> Path:
        """Where VERSION's files live in the cache; the commit in the name keeps registries sharing a cache apart."""
        return self.cache / version.name / f"{version.version}-{version.commit[:12]}"

    def materialize(self, version: AdapterVersion) -> AdapterSpec:
        """Write VERSION's files into the cache once (from the DVC remote if need be), then check them."""
        path = self.folder(version)
        if not path.is_dir():
            # One writer at a time, across threads and processes; DVC's checkout writes a staging folder
            # and renames it, so a folder that exists is complete.
            with locked(self.cache / ".materialize.lock"):
                if not path.is_dir():
                    try:
                        self.registry.checkout(version, path)
                    except AdaptersError as exc:
                        raise ServeError(f"Cannot fetch the files of {version.ref}: {exc}") from None
        spec = AdapterSpec(version.name, str(version.version), path)
        self.check(spec)
        self._checked[path] = spec
        return spec

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
        if self.fidelity is not None:
            self.fidelity.admit(spec.key, summary)
