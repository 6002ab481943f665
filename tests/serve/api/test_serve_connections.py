"""Clients that hold the server's resources without using them: a reader that stops reading its stream, a connection
that sends its request head slowly, and one address opening many connections. Raw sockets over real HTTP, the fake
engine behind them (its counters say what it generated)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from serving import serving, wait_for

from adapterctl.registry.repo import Registry
from adapterctl.serve.api.connections import Limits

MAX_TOKENS = 50_000


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return Registry.init(tmp_path_factory.mktemp("connections") / "registry")[0]


@pytest.fixture(params=["httptools", "h11"])
def http(request: pytest.FixtureRequest) -> str:
    """uvicorn's two HTTP/1.1 implementations: the guards subclass whichever it runs."""
    return request.param


@contextmanager
def guarded(registry: Registry, base: Path, limits: Limits, http: str) -> Iterator[tuple[int, Any, Any]]:
    """A server of the fake engine (its base folder BASE) whose connections LIMITS guards, on a free port; yields the
    port, the engine and the uvicorn server."""
    from fake_engine import FakeEngine

    from adapterctl.serve.api.connections import protocol

    engine = FakeEngine(context_length=MAX_TOKENS + 100, max_batch=4)
    settings, config = {"max_tokens_cap": MAX_TOKENS}, {"http": protocol(limits, http)}
    with serving(engine, registry, base, settings=settings, uvicorn=config) as server:
        yield server.port, engine, server.uvicorn


def connect(port: int, source: str = "127.0.0.1", receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:  # set before connecting: it bounds the window the server may fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.settimeout(30)
    return sock


def request(path: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    method = "POST" if body is not None else "GET"
    head = f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + data


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:  # closed with bytes of ours unread: a reset, after what it sent
        pass
    return received


def test_a_stream_nobody_reads_pauses_its_generation_then_is_aborted(
    registry: Registry, tiny_base: Path, http: str, caplog: pytest.LogCaptureFixture
) -> None:
    from adapterctl.serve.api.serving import BUFFERED
    from fake_engine import UNREAD

    caplog.set_level(logging.INFO, logger="serve")
    with guarded(registry, tiny_base, Limits(stall_seconds=2), http) as (port, engine, server):
        body = {"model": "fake", "prompt": "once", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
        sock = connect(port, receive_buffer=4096)
        sock.sendall(request("/v1/completions", {**body, "n": 2, "logprobs": 20}))  # and never reads
        # The socket's buffers full, uvicorn holds back the response; then the chunks fill the buffers behind it.
        full = lambda: engine.parked == 2 and any(c.flow.write_paused for c in server.server_state.connections)  # noqa: E731
        wait_for(full, 60, "the response to be held back and both generations to pause")
        at_pause = engine.tokens
        wait_for(lambda: engine.status().running == 0, 30, "the stalled request to be aborted")
        # Nobody reads: since the response was held back, only what the per-request buffers hold was generated.
        assert engine.tokens <= at_pause + 2 * (BUFFERED + UNREAD + 1) + 1 and engine.tokens < MAX_TOKENS // 10
        assert engine.parked == 0
        assert "its response was held back for 2 s" in caplog.text
        assert "status=499" in caplog.text
        assert answer(sock).startswith(b"HTTP/1.1 200")  # what the buffers held, then the connection closed
        reader = connect(port)  # the server serves on
        reader.sendall(request("/v1/completions", {**body, "max_tokens": 5}))
        assert b"data: [DONE]" in answer_until(reader, b"data: [DONE]")


def answer_until(sock: socket.socket, end: bytes) -> bytes:
    received = b""
    while end not in received and (chunk := sock.recv(65536)):
        received += chunk
    return received


def test_a_request_head_that_comes_too_slowly_is_closed(registry: Registry, tiny_base: Path, http: str) -> None:
    with guarded(registry, tiny_base, Limits(header_seconds=0.5), http) as (port, _, _):
        slow = connect(port)
        slow.sendall(b"GET /v1/mod")  # and no more
        assert answer(slow).startswith(b"HTTP/1.1 408 Request Timeout")
        kept = connect(port)
        kept.sendall(request("/healthz"))
        assert answer_until(kept, b'"ok"}').startswith(b"HTTP/1.1 200")  # answered; the connection is kept alive
        kept.sendall(b"GET /v1/mod")  # a second request's head, half sent on it
        assert answer(kept).startswith(b"HTTP/1.1 408 Request Timeout")


def test_one_address_gets_at_most_its_connections_and_others_are_served(
    registry: Registry, tiny_base: Path, http: str, caplog: pytest.LogCaptureFixture
) -> None:
    with guarded(registry, tiny_base, Limits(per_client=3), http) as (port, _, _):
        held = [connect(port) for _ in range(3)]
        for _ in range(2):
            refused = connect(port)
            refused.sendall(request("/healthz"))
            assert answer(refused).startswith(b"HTTP/1.1 503 Service Unavailable")
        assert caplog.text.count("Refusing connections from 127.0.0.1") == 1  # a flood is one log line
        other = connect(port, source="127.0.0.2")
        other.sendall(request("/healthz"))
        assert answer_until(other, b"\r\n").startswith(b"HTTP/1.1 200")
        held[0].close()  # a connection closed frees its place
        wait_for(lambda: _served(port), 10, "a fourth connection to be served once one closed")


def _served(port: int) -> bool:
    with connect(port) as sock:
        sock.sendall(request("/healthz"))
        return answer_until(sock, b"\r\n").startswith(b"HTTP/1.1 200")
