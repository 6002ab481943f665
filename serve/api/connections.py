"""Guards on the server's connections, below the app: a header-read timeout, a cap per client address, and a
stall timeout for a client that stops reading its response.

uvicorn has none of these (its keep-alive timeout starts only after a response), so they live in a subclass of the
HTTP protocol uvicorn would pick, which sees each connection's bytes and its transport's flow control.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

log = logging.getLogger("serve")
_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"


@dataclass(frozen=True)
class Limits:
    """How long a client may take and how many connections it may hold."""

    header_seconds: float = 10.0
    """Seconds a request's line and headers may take to arrive, from the connection (or the previous response)."""
    per_client: int = 64
    """Open connections one client address may hold; the next one is answered 503 and closed."""
    stall_seconds: float = 60.0
    """Seconds a response may wait on a client that does not read it; then the connection is closed and the
    request's generations aborted."""
    send_buffer: int = 256 << 10
    """Bytes the kernel holds for a connection's client (Linux doubles it); its autotuning would let that grow to
    4 MiB, which a stream whose client stops reading fills before it is held back. 256 KiB still sends 2.5 MB/s
    over 100 ms of round trip."""


def protocol(limits: Limits, http: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class HTTP, guarded by LIMITS; its connections share one count per address."""
    base: Any = import_from_string(HTTP_PROTOCOLS[http])
    clients = _Clients(limits)

    class Guarded(_Guard, base):  # type: ignore[misc, valid-type]
        """One connection, closed when its headers come too slowly or its client stops reading."""

        _clients = clients

    return Guarded


class _Clients:
    """The connections one server holds per client address, within LIMITS."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open_by_address: Counter[str] = Counter()
        self.refusing: set[str] = set()  # addresses at their cap, warned about once until they drop below it

    def opened(self, address: str) -> bool:
        """Count a connection from ADDRESS; False when that takes it over its cap (warned about once)."""
        self.open_by_address[address] += 1
        if self.open_by_address[address] <= self.limits.per_client:
            return True
        if address not in self.refusing:
            self.refusing.add(address)
            log.warning(
                "Refusing connections from %s: it holds %d already (--max-connections-per-client).",
                address,
                self.limits.per_client,
            )
        return False

    def closed(self, address: str) -> None:
        """Uncount a connection from ADDRESS."""
        self.open_by_address[address] -= 1
        if self.open_by_address[address] < self.limits.per_client:
            self.refusing.discard(address)
        if not self.open_by_address[address]:
            del self.open_by_address[address]


class _Guard:
    """The guards, mixed into uvicorn's protocol class (which `protocol` picks): a header timer and a stall timer
    per connection, and the count of its client's connections."""

    _clients: _Clients
    # uvicorn's protocol classes set these.
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    client: tuple[str, int] | None
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        limits = self._clients.limits
        if (sock := transport.get_extra_info("socket")) is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits.send_buffer)
        self._header_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._address = self.client[0] if self.client else ""
        if not self._clients.opened(self._address):
            _answer(transport, _BUSY, f"This client holds {limits.per_client} connections already; retry later.")
            return
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._clients.closed(self._address)
        for timer in (self._header_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():  # kept alive: the next request's head has as long as the first's
            self._await_headers()

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self._clients.limits.stall_seconds, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _await_headers(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        awaited = self.cycle  # a new request's cycle replaces it once its headers are in
        self._header_timer = self.loop.call_later(self._clients.limits.header_seconds, self._headers_late, awaited)

    def _headers_late(self, awaited: Any) -> None:
        self._header_timer = None
        seconds = self._clients.limits.header_seconds
        idle = awaited is None or awaited.response_complete  # not a pipelined request whose head came already
        if self.cycle is awaited and idle and not self.transport.is_closing():
            log.info("Closed a connection from %s: no whole request head in %g s.", self._address, seconds)
            _answer(self.transport, _TIMEOUT, f"No whole request head came in {seconds:g} s.")

    def _stalled(self) -> None:
        self._stall_timer = None
        log.warning(
            "Closed a connection from %s: its response was held back for %g s, its client reading too little "
            "(--stall-timeout).",
            self._address,
            self._clients.limits.stall_seconds,
        )
        self.transport.abort()  # the buffered bytes go too; the request sees a disconnect and aborts its work


def _answer(transport: asyncio.Transport, head: bytes, text: str) -> None:
    """Write a plain-text error and close the connection."""
    body = text.encode()
    transport.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
    transport.close()
