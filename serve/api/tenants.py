"""Tenants: API keys (stored as sha256 hashes) mapped to who may use which adapters, how much at once and per
minute."""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import logging
import math
import secrets
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from adapterctl.core.cache import write_atomic
from adapterctl.core.errors import AdaptersError
from adapterctl.core.hashing import SHA256
from adapterctl.registry.names import check_name
from adapterctl.serve.errors import BadRequest, Forbidden, TooManyRequests, Unauthorized, Unavailable

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
    max_concurrent: int | None = None  # generations at once: prompts x max(n, best_of) of its running requests
    max_tokens: int | None = None  # per request
    max_tokens_per_minute: int | None = None  # prompt and completion tokens of the requests admitted in a minute
    weight: float = 1.0  # its share of the engine when tenants contend: served tokens count 1 / weight
    admin: bool = False
    scrape: bool = False  # may read /metrics, which names every tenant and adapter version

    def may_use(self, adapter: str) -> bool:
        """True when one of the tenant's patterns matches the adapter NAME."""
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)


OPEN = Tenant("open", admin=True, scrape=True)  # no tenants file: everything, for whoever reaches 127.0.0.1
ADMIN = Tenant("admin", admin=True, scrape=True)
METRICS = Tenant("metrics", adapters=(), scrape=True)  # the metrics key: /metrics and nothing else
LIMITS = ("max_concurrent", "max_tokens", "max_tokens_per_minute")


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
        """The tenant KEY belongs to; Forbidden for the metrics key, which reads /metrics only."""
        tenant = self._holder(key)
        if tenant is METRICS:
            raise Forbidden("The metrics key reads /metrics only; call the API with a tenant's key.")
        return tenant

    def scraper(self, key: str | None) -> None:
        """Let KEY read /metrics: the admin or the metrics key (anyone in open mode); Unauthorized for the rest."""
        if not self._holder(key).scrape:
            raise Unauthorized(
                "/metrics names every tenant: send the admin key or the metrics key (`adapters tenants metrics`) "
                "as `Authorization: Bearer KEY`."
            )

    def _holder(self, key: str | None) -> Tenant:
        """Who holds KEY; Unauthorized when it is missing or unknown, Unavailable while the file is bad."""
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
        limits = {limit: entry.get(limit) for limit in LIMITS}
        for limit, value in limits.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise TenantsFileError(f"{where}: `{limit}` must be a positive integer.")
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < math.inf:
            raise TenantsFileError(f"{where}: `weight` must be a positive number (its share of the engine).")
        _add(by_hash, entry.get("key_sha256"), Tenant(str(name), tuple(patterns), **limits, weight=weight), where)
    for key_field, holder in (("admin_key_sha256", ADMIN), ("metrics_key_sha256", METRICS)):
        if data.get(key_field) is not None:
            _add(by_hash, data[key_field], holder, f"{path}: {key_field}")
    return by_hash


def _add(by_hash: dict[str, Tenant], digest: Any, tenant: Tenant, where: str) -> None:
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise TenantsFileError(f"{where}: the key hash must be 64 lowercase hex digits (sha256).")
    if digest in by_hash:
        raise TenantsFileError(f"{where}: the same key is also given to {by_hash[digest].name!r}.")
    by_hash[digest] = tenant


def add_tenant(
    path: Path,
    name: str,
    adapters: list[str],
    max_concurrent: int | None,
    max_tokens: int | None,
    max_tokens_per_minute: int | None = None,
    weight: float | None = None,
) -> str:
    """Add tenant NAME to the tenants file at PATH with a new key; returns the key, which is stored only hashed."""
    check_name(name)
    data = read(path)
    tenants = data.get("tenants") or {}
    if name in tenants:
        raise TenantsFileError(f"Tenant {name!r} is already in {path}; remove its entry first to issue a new key.")
    key = new_key()
    entry: dict[str, Any] = {"key_sha256": hash_key(key), "adapters": adapters}
    limits = zip(LIMITS, (max_concurrent, max_tokens, max_tokens_per_minute), strict=True)
    entry.update({limit: value for limit, value in limits if value})
    if weight is not None:
        entry["weight"] = weight
    data["tenants"] = {**tenants, name: entry}
    _write(path, data)
    return key


def set_admin(path: Path) -> str:
    """Give the tenants file at PATH a new admin key (replacing any); returns the key, stored only hashed."""
    return _set_key(path, "admin_key_sha256")


def set_metrics(path: Path) -> str:
    """Give the tenants file at PATH a new metrics key, for /metrics only (replacing any); returns it, stored hashed."""
    return _set_key(path, "metrics_key_sha256")


def _set_key(path: Path, key_field: str) -> str:
    data = read(path)
    key = new_key()
    data[key_field] = hash_key(key)
    _write(path, data)
    return key


def _write(path: Path, data: dict[str, Any]) -> None:
    """Check, then replace the file in one rename, so a running server never reads half of it."""
    parse(data, path)
    write_atomic(path, _HEADER + yaml.safe_dump(data, sort_keys=False))


WINDOW = 60.0  # seconds: max_tokens_per_minute counts the tokens of the requests admitted in the last minute


@dataclass(eq=False)
class _Spend:
    """Tokens one request counts against its tenant's minute: reserved at admission, settled when it ends."""

    at: float
    tokens: int


@dataclass(eq=False)
class Hold:
    """What one admitted request holds of its tenant's limits until Limiter.release."""

    tenant: Tenant
    generations: int
    spend: _Spend | None = None
    released: bool = False


class Limiter:
    """Each tenant's generations running (max_concurrent) and tokens of the last minute (max_tokens_per_minute).

    A request that alone exceeds a limit is a BadRequest, since no retry can pass it; one that fits but finds too
    little free is TooManyRequests. Tokens are counted when admitted (prompt tokens plus max_tokens for every
    generation) and settled to what really ran when the request ends, so a request that stops early frees the rest.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # seconds; tests pass their own to move time on
        self._running: Counter[str] = Counter()
        self._spent: defaultdict[str, deque[_Spend]] = defaultdict(deque)

    def acquire(self, tenant: Tenant, prompts: int, choices: int) -> Hold:
        """Take PROMPTS x CHOICES of TENANT's generations; release the result once the request ends."""
        generations, limit = prompts * choices, tenant.max_concurrent
        if limit is not None and generations > limit:
            raise BadRequest(
                f"This request runs {generations} generations ({prompts} prompts x {choices} choices, the larger of "
                f"n and best_of), over the {limit} tenant {tenant.name!r} may run at once (max_concurrent); "
                "split it into requests of at most that many prompts x choices.",
                param="prompt" if prompts > 1 else "n",
            )
        running = self._running[tenant.name]
        if limit is not None and running + generations > limit:
            raise TooManyRequests(
                f"Tenant {tenant.name!r} runs {running} of its {limit} generations at once (max_concurrent) and "
                f"this request needs {generations}; retry when some finish."
            )
        self._running[tenant.name] += generations
        return Hold(tenant, generations)

    def reserve(self, hold: Hold, tokens: int) -> None:
        """Count TOKENS (prompt tokens plus max_tokens x generations) against the tenant's last minute."""
        tenant, limit = hold.tenant, hold.tenant.max_tokens_per_minute
        if limit is None:
            return
        if tokens > limit:
            raise BadRequest(
                f"This request may use {tokens} tokens (its prompt tokens plus max_tokens x {hold.generations} "
                f"generations), over the {limit} per minute of tenant {tenant.name!r} (max_tokens_per_minute); "
                "lower max_tokens or send fewer prompts or choices.",
                param="max_tokens",
            )
        now, spent = self.clock(), self._spent[tenant.name]
        while spent and spent[0].at <= now - WINDOW:
            spent.popleft()
        used = sum(s.tokens for s in spent)
        if used + tokens > limit:
            # The oldest spends leave the window first: wait until those that free enough have left it.
            totals = zip(spent, itertools.accumulate(s.tokens for s in spent), strict=True)
            freed_at = next(s.at for s, total in totals if total >= used + tokens - limit)
            wait = freed_at + WINDOW - now
            raise TooManyRequests(
                f"Tenant {tenant.name!r} has {limit - used} of its {limit} tokens per minute left "
                f"(max_tokens_per_minute) and this request may use {tokens}; retry in {math.ceil(wait)} s.",
                retry_after=max(math.ceil(wait), 1),
            )
        hold.spend = _Spend(now, tokens)
        spent.append(hold.spend)

    def release(self, hold: Hold, used: int) -> None:
        """Give back HOLD's generations and settle its reserved tokens to USED (prompt plus generated), once."""
        if hold.released:
            return
        hold.released = True
        self._running[hold.tenant.name] -= hold.generations
        if hold.spend is not None:
            hold.spend.tokens = used
