"""S3-compatible DVC storage: moto's server on 127.0.0.1 behind a small proxy that counts and slows requests."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import assert_checks_out, environment, sha_tree, start_adapters

from adapterctl.registry.repo import Registry
from adapterctl.registry.remotes import set_remote

BUCKET = "adapters"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, with a bucket; credentials are moto's dummies."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "moto server did not start"
            time.sleep(0.2)
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("PUT", f"/{BUCKET}")
    assert conn.getresponse().status == 200
    with environment(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"):
        yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


class Proxy:
    """Forwards HTTP to moto and counts requests by method; can act as one slow link, and can stall uploads."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.delay = 0.0
        """Seconds each request holds the link (requests take turns)."""
        self.stall_after_puts: int | None = None
        """Uploads past this many wait until `unstall` (and are then dropped, as if the client had gone)."""
        self.counts: Counter[str] = Counter()
        self._link = threading.Lock()
        self._unstalled = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # so boto's "Expect: 100-continue" uploads get their go-ahead

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _forward(self) -> None:
                body = self._body()
                stall = proxy.stall_after_puts
                if self.command == "PUT" and stall is not None and proxy.counts["PUT"] >= stall:
                    proxy._unstalled.wait(120)
                    self.close_connection = True
                    return
                with proxy._link:
                    time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                dropped = ("host", "expect", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date"):
                        self.send_header(key, value)
                # A HEAD reply has no body but must still tell the object's size.
                length = reply.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                proxy.counts[self.command] += 1

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def unstall(self) -> None:
        """Let stalled uploads go (they are dropped) and stop stalling new ones."""
        self.stall_after_puts = None
        self._unstalled.set()

    def close(self) -> None:
        self.unstall()
        self.server.shutdown()


@pytest.fixture
def s3_registry(tmp_path: Path, moto_endpoint: str) -> Iterator[tuple[Registry, Proxy]]:
    """A registry whose git remote is a local bare repository and whose DVC storage is S3 (through the proxy)."""
    proxy = Proxy(moto_endpoint)
    reg, _ = Registry.init(tmp_path / "registry")
    prefix = f"s3://{BUCKET}/{tmp_path.name}"
    set_remote(reg, "origin", str(tmp_path / "origin.git"), prefix, {"endpointurl": proxy.url}, create=True)
    yield reg, proxy
    proxy.close()


def test_s3_round_trip_and_an_unchanged_push_uploads_nothing(s3_registry, make_adapter, tmp_path: Path, cli) -> None:
    registry, proxy = s3_registry
    listed = cli("remote", "list", cwd=registry.root).output
    assert f"dvc s3://{BUCKET}/{tmp_path.name}" in listed
    registry.add("support", make_adapter(1))
    registry.add("support", make_adapter(2))
    registry.promote("support@v1.0.0", "prod")
    pushed = cli("push", cwd=registry.root)
    assert pushed.exit_code == 0, pushed.output
    assert proxy.counts["PUT"] >= 5  # each distinct file and the two file lists
    proxy.counts.clear()
    again = cli("push", cwd=registry.root)
    assert again.exit_code == 0 and again.output == "Everything is already on origin.\n"
    assert proxy.counts["PUT"] == 0 and proxy.counts["POST"] == 0
    mate = tmp_path / "mate"
    cloned = cli("clone", str(tmp_path / "origin.git"), str(mate), cwd=tmp_path)
    assert cloned.exit_code == 0, cloned.output
    assert cli("checkout", "support#prod", "-o", str(tmp_path / "prod"), cwd=mate).exit_code == 0
    assert sha_tree(tmp_path / "prod") == sha_tree(make_adapter(1))
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(2))


def test_a_push_killed_part_way_leaves_no_remote_ref_and_completes_when_re_run(
    s3_registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry, proxy = s3_registry
    for name, seeds in (("support", (1, 2, 3)), ("contacts", (4, 5))):
        for seed in seeds:
            registry.add(name, make_adapter(seed))
    proxy.delay = 0.1  # a slow link...
    proxy.stall_after_puts = 3  # ...that stops moving after three uploads, until the push is killed
    child = start_adapters("push", cwd=registry.root)
    deadline = time.monotonic() + 120
    while proxy.counts["PUT"] < 3:
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    origin = tmp_path / "origin.git"
    ls_remote = subprocess.run(["git", "ls-remote", str(origin)], capture_output=True, text=True, check=True)
    assert ls_remote.stdout == ""  # objects go first: no ref was published
    proxy.unstall()
    proxy.delay = 0.0
    rerun = cli("push", cwd=registry.root)
    assert rerun.exit_code == 0, rerun.output
    assert "support@v1.2.0" in rerun.output and "contacts@v1.1.0" in rerun.output
    mate = tmp_path / "mate"
    assert cli("clone", str(origin), str(mate), cwd=tmp_path).exit_code == 0
    for ref, seed in (("support@v1.0.0", 1), ("support@v1.1.0", 2), ("contacts@v1.0.0", 4)):
        assert_checks_out(cli, mate, ref, make_adapter(seed), tmp_path / f"out-{seed}")
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(3))


def test_an_unreachable_s3_endpoint_is_one_clear_error(tmp_path: Path, make_adapter, cli, moto_endpoint: str) -> None:
    registry, _ = Registry.init(tmp_path / "registry")
    dead = f"http://127.0.0.1:{_free_port()}"
    set_remote(registry, "origin", str(tmp_path / "origin.git"), f"s3://{BUCKET}/x", {"endpointurl": dead}, create=True)
    registry.add("support", make_adapter(1))
    result = cli("push", cwd=registry.root)
    assert result.exit_code == 9
    assert result.stderr.startswith("Error: checking the DVC remote failed: Could not connect to the endpoint URL")
    assert len(result.stderr.strip().splitlines()) == 1
    ls_remote = subprocess.run(["git", "ls-remote", str(tmp_path / "origin.git")], capture_output=True, text=True)
    assert ls_remote.stdout == ""


def _s3_object(endpoint: str, method: str, key: str, body: bytes | None = None) -> bytes:
    """GET, PUT or DELETE object KEY in the bucket directly on moto (behind DVC's back), with boto3."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    if method == "GET":
        return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    if method == "PUT":
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    else:
        s3.delete_object(Bucket=BUCKET, Key=key)
    return b""


def test_s3_objects_that_rotted_or_vanished_are_found_by_verify_and_pushed_again(
    s3_registry, make_adapter, tmp_path: Path, cli, moto_endpoint: str
) -> None:
    import hashlib

    registry, _ = s3_registry
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in make_adapter(1).iterdir()}
    key = lambda name: f"{tmp_path.name}/files/md5/{md5[name][:2]}/{md5[name][2:]}"  # noqa: E731
    weights = _s3_object(moto_endpoint, "GET", key("adapter_model.safetensors"))
    _s3_object(moto_endpoint, "PUT", key("adapter_model.safetensors"), b"\0" + weights[1:])  # one flipped byte
    _s3_object(moto_endpoint, "DELETE", key("README.md"))
    verified = cli("verify", "--remote", cwd=registry.root)
    assert verified.exit_code == 8
    assert verified.output.splitlines() == [
        "support@v1.0.0: README.md missing on origin; fix: adapters push --verify",
        "support@v1.0.0: adapter_model.safetensors corrupt on origin; fix: adapters push --verify",
        "1 versions checked here and on the remote: 2 problems.",
    ]
    repaired = cli("push", "--verify", cwd=registry.root)
    assert repaired.output == "Pushed to origin: 2 files, 0 tags.\n  repaired support@v1.0.0\n"
    assert _s3_object(moto_endpoint, "GET", key("adapter_model.safetensors")) == weights
    assert cli("verify", "--remote", cwd=registry.root).exit_code == 0
    mate = tmp_path / "mate"
    assert cli("clone", str(tmp_path / "origin.git"), str(mate), cwd=tmp_path).exit_code == 0
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(1))
