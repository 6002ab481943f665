"""The server's view of the registry under faults, over real HTTP: a registry folder gone and back, tags that
are malformed, foreign or without their files, a promotion caught half-way, damaged files in the server's
cache; and the request log and body limit against hostile requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from helpers import sha_tree
from serving import Server, registry_with, serving, wait_for

from adapterctl.core.hashing import sha256_file
from adapterctl.registry.refs import AdapterVersion
from adapterctl.registry.repo import Registry
from adapterctl.registry.store import file_md5
from adapterctl.serve.catalog.versions import Catalog
from adapterctl.serve.errors import AdapterNotFound

PROMPT = "The quick brown fox"
WEIGHTS = "adapter_model.safetensors"
MAX_BODY = 64 * 1024


@dataclass
class Served:
    """A running open-mode server whose catalog re-reads the registry every 50 ms and calls it stale at once."""

    server: Server
    registry: Registry
    folders: dict[str, list[Path]]

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def catalog(self) -> Catalog:
        return self.server.catalog

    def post(self, path: str, **body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=60)

    def complete(self, model: str) -> httpx.Response:
        return self.post("/v1/completions", model=model, prompt=PROMPT, max_tokens=8, temperature=0)

    def bare(self, name: str) -> str | None:
        """The version NAME means to the server now (None: not found)."""
        return httpx.get(f"{self.url}/v1/models/{quote(name, safe='@')}").json().get("version")

    def unload(self, model: str) -> None:
        """Drop MODEL from memory, so that its next request reads its files from the cache again."""
        assert self.post("/admin/unload", model=model).json()["unloaded"] is True


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, make_adapter: Any) -> Iterator[Served]:
    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    root = tmp_path_factory.mktemp("faults")
    folders = {
        "alpha": [make_adapter(1)],
        "swap": [make_adapter(2), make_adapter(3)],
        "cached": [make_adapter(4)],
        "fragile": [make_adapter(5)],
        "extra": [make_adapter(6)],
        "burst": [make_adapter(7), make_adapter(8), make_adapter(9)],
    }
    registry = registry_with(root / "registry", folders)
    engine = TransformersEngine(tiny_base, model_id="tiny-llama", quantize="none", max_loaded=4, max_batch=8)
    settings = {"max_tokens_cap": 512, "max_body_bytes": MAX_BODY}
    # stale_after=0: any failed read makes /readyz say so, no waiting in tests.
    with serving(engine, registry, tiny_base, settings=settings, interval=0.05, stale_after=0) as server:
        server.catalog.settle = 3600  # a half-done stage change is held until its other half comes
        yield Served(server, registry, folders)


def _tag(registry: Registry, name: str, version: AdapterVersion, message: str) -> None:
    """Write one stage tag as promote does, dated after the adapter's newest."""
    adapter = registry.state().adapter(version.name)
    registry.git.tag(name, version.commit, message, adapter.last_date + 1)


def test_a_registry_folder_away_makes_readyz_say_so_and_following_resumes_when_it_is_back(
    served: Served, cli: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="serve")
    assert served.complete("alpha").status_code == 200
    root = served.registry.root
    away = root.with_name("registry-away")
    root.rename(away)
    try:
        unready = wait_for(lambda: (r := httpx.get(f"{served.url}/readyz")).status_code == 503 and r, 10, "503")
        reason = unready.json()["error"]["message"]
        assert "The adapter registry has not been readable for" in reason and str(root) not in reason
        refresh = served.post("/admin/refresh")
        assert refresh.status_code == 503 and "Cannot read the adapter registry" in refresh.json()["error"]["message"]
        assert served.complete("alpha").status_code == 200  # what it read before keeps serving
    finally:
        away.rename(root)
    wait_for(lambda: httpx.get(f"{served.url}/readyz").status_code == 200, 10, "ready again")
    warnings = [r.getMessage() for r in caplog.records if "Cannot re-read the registry" in r.getMessage()]
    assert 1 <= len(warnings) <= 2  # once per distinct failure, not twenty times a second
    # The thread that follows the registry survived: a promotion reaches the server without /admin/refresh.
    assert cli("promote", "swap@v1.0.0", "--stage", "staging", cwd=root).exit_code == 0
    wait_for(lambda: served.bare("swap#staging") == "swap@v1.0.0", 10, "the promotion to reach the server")


def test_malformed_and_foreign_tags_are_ignored_with_one_warning(
    served: Served, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING, logger="serve")
    git = served.registry.git
    for tag in ("alpha@v01.0.0", "beta-@v1.0.0", "release-2024", "alpha#prod#x"):
        git.run("tag", "-a", tag, "-m", "made by hand")
    try:
        for _ in range(2):
            refreshed = served.post("/admin/refresh")
            assert refreshed.status_code == 200, refreshed.text
            assert refreshed.json()["adapters"]["alpha"] == "alpha@v1.0.0"
            assert "beta-" not in refreshed.json()["adapters"]  # a name no reference could ever name
        assert httpx.get(f"{served.url}/readyz").status_code == 200
        assert served.complete("alpha").json()["model"] == "alpha@v1.0.0"
        # A server starting on such a registry starts.
        fresh = Catalog(served.registry, tmp_path / "cache", base_id="b", fingerprint="f", max_rank=8)
        assert "alpha" in fresh.state.adapters
    finally:
        git.run("tag", "-d", "alpha@v01.0.0", "beta-@v1.0.0", "release-2024", "alpha#prod#x")
    ignored = [r.getMessage() for r in caplog.records if "Ignoring the tag 'alpha@v01.0.0'" in r.getMessage()]
    assert len(ignored) == 2  # once by the running server, once by the one that started
    assert any("Ignoring the tag 'beta-@v1.0.0'" in r.getMessage() for r in caplog.records)


def test_a_version_tag_without_its_files_is_a_422_naming_no_server_path(served: Served) -> None:
    git, root = served.registry.git, served.registry.root
    git.run("tag", "-a", "ghost@v1.0.0", "-m", "a version tag on a commit without adapters/ghost.dvc")
    (root / "adapters" / "garbled.dvc").write_text("outs: [[[\n")  # a pointer file edited into nonsense
    git.run("add", "adapters/garbled.dvc")
    git.run("commit", "-q", "-m", "garbled pointer")
    git.run("tag", "-a", "garbled@v1.0.0", "-m", "a version whose .dvc file is not YAML")
    git.run("rm", "-q", "adapters/garbled.dvc")
    git.run("commit", "-q", "-m", "remove the garbled pointer")
    try:
        refreshed = served.post("/admin/refresh").json()["adapters"]
        assert refreshed["ghost"] == "ghost@v1.0.0" and refreshed["garbled"] == "garbled@v1.0.0"
        for name in ("ghost", "garbled"):
            response = served.complete(name)
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["code"] == "adapter_rejected"
            assert error["message"].startswith(f"{name}@v1.0.0 cannot be served")
            assert "/tmp" not in error["message"] and str(root) not in error["message"]
            assert served.post("/admin/load", model=name).status_code == 422
        assert served.complete("alpha").status_code == 200
    finally:
        git.run("tag", "-d", "ghost@v1.0.0", "garbled@v1.0.0")
        served.post("/admin/refresh")


def test_a_promotion_caught_half_way_keeps_the_previous_holder(served: Served, cli: Any) -> None:
    registry = served.registry
    v1, v2 = (registry.state().resolve(ref) for ref in ("swap@v1.0.0", "swap@v1.1.0"))
    assert cli("promote", v1.ref, "--stage", "prod", cwd=registry.root).exit_code == 0
    served.post("/admin/refresh")
    assert served.bare("swap") == served.bare("swap#prod") == v1.ref
    counter = registry.state().adapter("swap").last_counter
    # What promote writes first: the previous holder unassigned. The assign of v1.1.0 is not there yet.
    _tag(registry, f"swap#prod!#{counter + 1}", v1, "Unassign prod (Promote swap@v1.1.0 to prod)")
    assert "prod" not in registry.state().adapter("swap").stages()  # the registry itself has no holder now
    served.post("/admin/refresh")
    assert served.bare("swap") == v1.ref  # not the latest, v1.1.0, which nobody promoted yet
    assert served.bare("swap#prod") == v1.ref
    assert served.complete("swap").json()["model"] == v1.ref
    _tag(registry, f"swap#prod#{counter + 2}", v2, "Promote swap@v1.1.0 to prod")
    served.post("/admin/refresh")
    assert served.bare("swap") == served.bare("swap#prod") == v2.ref
    assert served.complete("swap").json()["model"] == v2.ref
    # A lone unassign (a stage taken away for good) holds only for the settle time: here none.
    _tag(registry, f"swap#prod!#{counter + 3}", v2, "Unassign prod")
    quick = Catalog(registry, Path(served.catalog.cache), base_id="b", fingerprint="f", max_rank=8, settle=0)
    quick.refresh()
    assert quick.lookup("swap", lambda name: True) == v2  # no prod: the latest
    with pytest.raises(AdapterNotFound, match="holds stage 'prod'"):
        quick.lookup("swap#prod", lambda name: True)


def test_a_burst_of_promotions_only_ever_shows_versions_that_held_prod(served: Served) -> None:
    registry = served.registry
    promoted = {"burst@v1.0.0", "burst@v1.1.0"}  # burst@v1.2.0, the latest, is never promoted
    seen: list[tuple[str | None, str | None]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append((served.bare("burst"), served.bare("burst#prod")))

    registry.promote("burst@v1.0.0", "prod")
    wait_for(lambda: served.bare("burst#prod") == "burst@v1.0.0", 10, "the first promotion")
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(40):
            registry.promote(f"burst@v1.{(i + 1) % 2}.0", "prod")
    finally:
        stop.set()
        watcher.join()
    wrong = [pair for pair in seen if not set(pair) <= promoted]
    assert not wrong, wrong
    assert {version for pair in seen for version in pair} == promoted  # the watch saw the burst, both ways


@pytest.mark.parametrize("damage", ["flip a bit", "truncate", "delete"])
def test_a_damaged_file_in_the_servers_cache_is_fetched_again(served: Served, damage: str) -> None:
    expected = served.complete("cached").json()
    assert expected["model"] == "cached@v1.0.0"
    version = served.registry.state().resolve("cached@v1.0.0")
    weights = served.catalog.folder(version) / WEIGHTS
    good = sha256_file(weights)
    data = weights.read_bytes()
    served.unload("cached@v1.0.0")
    if damage == "flip a bit":
        middle = len(data) - 100  # inside the tensors, past the header: still a readable safetensors file
        weights.write_bytes(data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :])
    elif damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.unlink()
    assert not weights.exists() or sha256_file(weights) != good  # the damage landed
    again = served.complete("cached").json()
    assert again["model"] == "cached@v1.0.0" and again["choices"] == expected["choices"]
    assert sha256_file(weights) == good


def test_a_damaged_cache_is_repaired_by_a_server_started_later(served: Served, tmp_path: Path) -> None:
    version = served.registry.state().resolve("alpha@v1.0.0")

    def catalog() -> Catalog:
        fingerprint = served.catalog.fingerprint
        return Catalog(served.registry, tmp_path / "cache", base_id="b", fingerprint=fingerprint, max_rank=64)

    weights = catalog().materialize(version).path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # as a crash mid-write would leave it
    spec = asyncio.run(catalog().resolve("alpha@v1.0.0", lambda name: True))  # a server started later
    assert spec is not None and sha_tree(spec.path) == sha_tree(served.folders["alpha"][0])


def test_a_cache_that_cannot_be_repaired_is_a_422_naming_no_server_path(served: Served) -> None:
    version = served.registry.state().resolve("fragile@v1.0.0")
    entries, _ = served.registry.files(version)
    digest = next(e["md5"] for e in entries if e["relpath"] == WEIGHTS)
    stored = served.registry.root / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    assert file_md5(stored) == digest
    stored.chmod(0o644)
    stored.write_bytes(b"rotten")  # the registry's own copy is bad too, and there is no remote to fetch from
    response = served.complete("fragile")
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("fragile@v1.0.0 cannot be served") and "/tmp" not in message
    assert served.complete("alpha").status_code == 200


def test_logged_values_are_escaped_one_request_one_line(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="serve")
    for forged, shown in (("x%0Afake status=200", "x\\nfake\\x20status=200"), ("x%00y", "x\\x00y")):
        response = httpx.get(f"{served.url}/v1/models/{forged}")
        assert response.status_code == 404
        request_id = response.headers["x-request-id"]
        lines = wait_for(
            lambda request_id=request_id: [r.getMessage() for r in caplog.records if request_id in r.getMessage()],
            5,
            "the log line",
        )
        assert len(lines) == 1 and "\n" not in lines[0] and "\x00" not in lines[0]
        assert f" GET /v1/models/{shown} tenant=" in lines[0] and " status=404 " in lines[0]


def _raw(url: str, head: str, body: bytes) -> bytes:
    """Send HEAD and BODY on a raw connection, without ending the body; the response the server sends anyway."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head.encode() + body)
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def test_a_body_over_the_limit_is_a_413_before_it_is_read(served: Served) -> None:
    announced = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    )
    # 50 MB announced, 20 bytes sent: an answer at all proves the server did not wait for the rest.
    answer = _raw(served.url, announced, b'{"model": "alpha", "')
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"code":"request_too_large"' in answer and b"limit of 65536 bytes (--max-body-bytes)" in answer
    chunked = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b'{"prompt": "' + b"x" * 40000
    chunks = b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for _ in range(2))  # 80 KB, never ended
    answer = _raw(served.url, chunked, chunks)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"code":"request_too_large"' in answer
    under = served.post("/v1/completions", model="alpha", prompt="fox " * 1000, max_tokens=2)
    assert under.status_code == 200  # 5 KB: within the limit
    assert httpx.get(f"{served.url}/readyz").status_code == 200


def test_admin_load_says_loaded_only_when_the_adapter_is_in_memory(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = served.server.engine
    step = engine._step

    def slow_step(*args: Any) -> None:  # a fault point: each step takes 0.1 s, so the streams outlast the test by far
        step(*args)
        time.sleep(0.1)

    monkeypatch.setattr(engine, "_step", slow_step)
    for model in engine.status().loaded:
        served.unload(model)
    busy = ["alpha@v1.0.0", "swap@v1.0.0", "swap@v1.1.0", "cached@v1.0.0"]  # every place: max_loaded is 4
    with contextlib.ExitStack() as streams:
        for model in busy:
            body = {"model": model, "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}
            response = streams.enter_context(
                httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60)
            )
            streams.enter_context(contextlib.closing(lines := response.iter_lines()))
            assert next(lines).startswith("data: ")  # generating: its adapter may not be evicted
        waiting = served.post("/admin/load", model="extra")
        assert waiting.status_code == 503, waiting.text
        assert "extra@v1.0.0 is read but not in memory" in waiting.json()["error"]["message"]
        assert "extra@v1.0.0" not in httpx.get(f"{served.url}/admin/loaded").json()["loaded"]
        again = served.post("/admin/load", model="alpha@v1.0.0").json()
        assert again["loaded"] is True and again["already"] is True
    # The streams hung up: their places free at the engine's next step, and the call succeeds then.
    loaded = wait_for(
        lambda: (r := served.post("/admin/load", model="extra")).status_code == 200 and r.json(), 30, "a free place"
    )
    assert loaded["loaded"] is True and "extra@v1.0.0" in httpx.get(f"{served.url}/admin/loaded").json()["loaded"]
