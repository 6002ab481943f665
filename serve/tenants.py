"""Tenants: API keys (stored as sha256 hashes) mapped to who may use which adapters, how much at once."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.cache import write_atomic
from core.errors import AdaptersError
from core.hashing import SHA256
from registry.names import check_name
from serve.errors import TooManyRequests, Unauthorized, Unavailable

log = logging.getLogger("serve")
_HEADER = "# API keys of the adapter server, stored as sha256 hashes only; `adapters tenants add` writes entries.\n"


class TenantsFileError(AdaptersError):
    """The tenants file cannot be read or holds an invalid entry."""

    exit_code = 2


@dataclass(frozen=True)
class Tenant:
    """A caller: the adapter names it may use (fnmatch patterns) and its limits (None: no limit)."""

    name: str
    adapters: tuple[str, ...] = ("*",)
    max_concurrent: int | None = None
    max_tokens: int | None = None
    admin: bool = False

    def may_use(self, adapter: str) -> bool:
        """True when one of the tenant's patterns matches the adapter NAME."""
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)


OPEN = Tenant("open", admin=True)  # no tenants file: every adapter and endpoint, for whoever reaches 127.0.0.1
ADMIN = Tenant("admin", admin=True)


def hash_key(key: str) -> str:
    """The sha256 hex digest a tenants file stores for KEY."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return f"sk-adapters-{secrets.token_urlsafe(32)}"


class Tenants:
    """The tenants file of a running server, re-read when it changes; without a file the server is open.

    A file that cannot be used (unreadable, invalid, or without a single key) fails closed: every key is
    refused with a 503, and /readyz says why, until the file is fixed. A revocation is never outlived by
    the keys read before it.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._by_hash: dict[str, Tenant] = {}
        self._stamp: tuple[int, ...] | None = None
        self._problem: str | None = None
        if path is not None:
            self._by_hash = _keys(path)
            self._stamp = _stamp(path)

    @property
    def open(self) -> bool:
        """True when no tenants file is used: no keys, no limits."""
        return self.path is None

    def authenticate(self, key: str | None) -> Tenant:
        """The tenant KEY belongs to; Unauthorized when it is missing or unknown, Unavailable while the file is bad."""
        if self.path is None:
            return OPEN
        keys = self._current()
        if self._problem is not None:
            raise Unavailable("The server cannot use its tenants file, so it accepts no key until it is fixed.")
        if not key:
            raise Unauthorized("Missing API key: send it as the header `Authorization: Bearer KEY`.")
        tenant = keys.get(hash_key(key))
        if tenant is None:
            raise Unauthorized("Incorrect API key provided.")
        return tenant

    def problem(self) -> str | None:
        """Why the tenants file cannot be used now (no server path in it), or None."""
        if self.path is None:
            return None
        self._current()
        if self._problem is None:
            return None
        reason = self._problem.replace(str(self.path), "the tenants file")
        return f"Every key is refused until the tenants file is fixed: {reason}"

    def _current(self) -> dict[str, Tenant]:
        """The keys as the file holds them now: a tenant added while the server runs can call at once."""
        assert self.path is not None
        try:
            stamp = _stamp(self.path)
            if stamp != self._stamp:
                self._stamp = stamp  # a broken file is read and reported once, not on every request
                self._by_hash, self._problem = {}, None
                self._by_hash = _keys(self.path)
        except (OSError, TenantsFileError) as exc:  # fail closed: the bad edit may have been a revocation
            self._stamp = None if isinstance(exc, OSError) else self._stamp
            if str(exc) != self._problem:
                log.error("The tenants file cannot be used, so every key is refused until it is fixed: %s", exc)
            self._by_hash, self._problem = {}, str(exc)
        return self._by_hash


def _keys(path: Path) -> dict[str, Tenant]:
    """The keys of the tenants file at PATH; one without any would refuse everyone, admin included, so is an error."""
    by_hash = parse(read(path), path)
    if not by_hash:
        raise TenantsFileError(
            f"{path} holds no keys, so every request would be refused: add one with "
            "`adapters tenants add NAME` or `adapters tenants admin`."
        )
    return by_hash


def _stamp(path: Path) -> tuple[int, ...]:
    info = path.stat()
    return info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size


def read(path: Path) -> dict[str, Any]:
    """The tenants file's YAML; an absent file is empty."""
    try:
        data = yaml.safe_load(path.read_text()) if path.exists() else {}
    except (OSError, yaml.YAMLError) as exc:
        raise TenantsFileError(f"Cannot read the tenants file {path}: {exc}") from None
    if not isinstance(data or {}, dict):
        raise TenantsFileError(f"{path} must hold a mapping with `tenants:` and `admin_key_sha256:`.")
    return data or {}


def parse(data: dict[str, Any], path: Path) -> dict[str, Tenant]:
    """Key hash -> tenant, for every tenant and the admin key; an invalid entry names itself."""
    tenants = data.get("tenants") or {}
    if not isinstance(tenants, dict):
        raise TenantsFileError(f"{path}: `tenants` must map tenant names to their settings.")
    by_hash: dict[str, Tenant] = {}
    for name, entry in tenants.items():
        where = f"{path}: tenant {name!r}"
        if not isinstance(entry, dict):
            raise TenantsFileError(f"{where} must be a mapping.")
        patterns = entry.get("adapters")
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise TenantsFileError(f"{where}: `adapters` must be a non-empty list of name patterns, e.g. ['acme-*'].")
        limits = {field: entry.get(field) for field in ("max_concurrent", "max_tokens")}
        for field, value in limits.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise TenantsFileError(f"{where}: `{field}` must be a positive integer.")
        _add(by_hash, entry.get("key_sha256"), Tenant(str(name), tuple(patterns), **limits), where)
    if data.get("admin_key_sha256") is not None:
        _add(by_hash, data["admin_key_sha256"], ADMIN, f"{path}: admin_key_sha256")
    return by_hash


def _add(by_hash: dict[str, Tenant], digest: Any, tenant: Tenant, where: str) -> None:
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise TenantsFileError(f"{where}: the key hash must be 64 lowercase hex digits (sha256).")
    if digest in by_hash:
        raise TenantsFileError(f"{where}: the same key is also given to {by_hash[digest].name!r}.")
    by_hash[digest] = tenant


def add_tenant(path: Path, name: str, adapters: list[str], max_concurrent: int | None, max_tokens: int | None) -> str:
    """Add tenant NAME to the tenants file at PATH with a new key; returns the key, which is stored only hashed."""
    check_name(name)
    data = read(path)
    tenants = data.get("tenants") or {}
    if name in tenants:
        raise TenantsFileError(f"Tenant {name!r} is already in {path}; remove its entry first to issue a new key.")
    key = new_key()
    entry: dict[str, Any] = {"key_sha256": hash_key(key), "adapters": adapters}
    entry.update({k: v for k, v in (("max_concurrent", max_concurrent), ("max_tokens", max_tokens)) if v})
    data["tenants"] = {**tenants, name: entry}
    _write(path, data)
    return key


def set_admin(path: Path) -> str:
    """Give the tenants file at PATH a new admin key (replacing any); returns the key, stored only hashed."""
    data = read(path)
    key = new_key()
    data["admin_key_sha256"] = hash_key(key)
    _write(path, data)
    return key


def _write(path: Path, data: dict[str, Any]) -> None:
    """Check, then replace the file in one rename, so a running server never reads half of it."""
    parse(data, path)
    write_atomic(path, _HEADER + yaml.safe_dump(data, sort_keys=False))


class Limiter:
    """Counts each tenant's running requests; one over its max_concurrent is refused."""

    def __init__(self) -> None:
        self._running: Counter[str] = Counter()

    def acquire(self, tenant: Tenant) -> Callable[[], None]:
        """Take one of TENANT's slots (TooManyRequests when none is free); call the result once to give it back."""
        if tenant.max_concurrent is not None and self._running[tenant.name] >= tenant.max_concurrent:
            raise TooManyRequests(
                f"Tenant {tenant.name!r} already has {tenant.max_concurrent} requests running, its limit; "
                "retry when one finishes."
            )
        self._running[tenant.name] += 1

        def release() -> None:
            self._running[tenant.name] -= 1

        return release
