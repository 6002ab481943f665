"""Helpers for server tests: the server in this process on a free port (its URL, app and an OpenAI client), a
server process, crafted adapters, SSE and metrics reading."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx
from helpers import ROOT
from prometheus_client.parser import text_string_to_metric_families

from adapterctl.registry.repo import Registry


@dataclass
class Server:
    """A server running in this process: its base URL, its app, and uvicorn's server object."""

    url: str
    app: Any
    uvicorn: Any

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def engine(self) -> Any:
        return self.app.state.server.engine

    @property
    def catalog(self) -> Any:
        return self.app.state.server.catalog

    @cached_property
    def client(self) -> Any:
        """The official OpenAI client, pointed at this server without an API key (open mode)."""
        return openai_client(self.url)


def openai_client(url: str, api_key: str = "unused") -> Any:
    """The official OpenAI client for the server at URL with API_KEY, retrying nothing (a test sees every answer)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)


@contextmanager
def serving(
    engine: Any,
    registry: Registry,
    base: Path,
    *,
    tenants: Path | None = None,
    settings: Mapping[str, Any] | None = None,
    uvicorn: Mapping[str, Any] | None = None,
    **options: Any,
) -> Iterator[Server]:
    """The server `adapters serve` builds (serve/server.py) of ENGINE on the base model folder BASE, for REGISTRY's
    adapters, on 127.0.0.1 in a thread; stops it (and closes ENGINE) after.

    ENGINE None: a fresh transformers engine on BASE. TENANTS: a tenants file (None: open mode). SETTINGS and UVICORN:
    options of the server's Settings and of uvicorn's Config; OPTIONS: build_app's (interval, stale_after,
    strict_fidelity). Adapters' files go to the user cache, as the command's do (the session's temp folder here).
    """
    from adapterctl.serve.api.dependencies import Settings
    from adapterctl.serve.api.tenants import Tenants
    from adapterctl.serve.server import build_app

    if engine is None:
        from adapterctl.serve.engines.transformers.engine import TransformersEngine

        engine = TransformersEngine(base, model_id="tiny-llama", quantize="none", max_loaded=2, max_batch=16)
    app = build_app(engine, base, registry, Tenants(tenants), Settings(**(settings or {})), **options)
    with serving_app(app, **(uvicorn or {})) as server:
        yield server


@contextmanager
def serving_app(app: Any, **config: Any) -> Iterator[Server]:
    """Run the ASGI APP with uvicorn (CONFIG: options of its Config) on 127.0.0.1, a free port, in a thread; stops it
    after. For apps other than the server's own (the console alone, the Hub double); `serving` starts the server."""
    import uvicorn

    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 60, "the server to start")
    assert thread.is_alive(), "the server thread died while starting"
    try:
        yield Server(f"http://127.0.0.1:{listener.getsockname()[1]}", app, server)
    finally:
        server.should_exit = True
        thread.join(60)


def wait_for(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    """Poll CONDITION until it returns something true; fail after SECONDS naming WHAT was awaited."""
    deadline = time.monotonic() + seconds
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.02)


def registry_with(root: Path, adapters: dict[str, list[Path]]) -> Registry:
    """A fresh adapter repository at ROOT holding NAME -> [folders], registered as v1.0.0, v1.1.0, ..."""
    registry, _ = Registry.init(root)
    for name, folders in adapters.items():
        for folder in folders:
            registry.add(name, folder)
    return registry


def crafted(source: Path, dest: Path, edit: Callable[[dict[str, Any], dict[str, Any]], None]) -> Path:
    """A copy of the adapter folder SOURCE whose adapter_config.json and lineage.json EDIT has changed."""
    shutil.copytree(source, dest)
    config, lineage = (json.loads((dest / name).read_text()) for name in ("adapter_config.json", "lineage.json"))
    edit(config, lineage)
    (dest / "adapter_config.json").write_text(json.dumps(config))
    (dest / "lineage.json").write_text(json.dumps(lineage))
    return dest


def reweighted(source: Path, dest: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the adapter folder SOURCE whose tensors (name -> torch tensor) EDIT has changed in place."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, dest)
    tensors = load_file(dest / "adapter_model.safetensors")
    edit(tensors)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, dest / "adapter_model.safetensors")
    return dest


def events(response: httpx.Response) -> list[Any]:
    """The data of each server-sent event of a streamed response, JSON-decoded ('[DONE]' kept as is)."""
    found = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


def metric(url: str, name: str, key: str | None = None, **labels: str) -> float:
    """The value of one Prometheus sample the server exposes at /metrics (0 when absent); KEY: with tenants, the
    admin or the metrics key."""
    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    response.raise_for_status()
    text = response.text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@contextmanager
def server_process(command: list[str], cwd: Path) -> Iterator[tuple[subprocess.Popen, str, list[str]]]:
    """Start `adapters serve` as python COMMAND; yields the process, its URL and its output lines as they come."""
    server = subprocess.Popen(
        [sys.executable, *command],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(server.stdout.readline, "")))
    reader.start()
    try:
        started = wait_for(
            lambda: [line for line in lines if " at http://" in line and "/v1" in line] or server.poll() is not None,
            120,
            "start",
        )
        assert server.poll() is None, "".join(lines)
        yield server, started[0].split(" at ")[1].split("/v1")[0], lines
    finally:
        if server.poll() is None:
            server.kill()
        reader.join()


@contextmanager
def serving_alpha(request: Any, tmp_path: Path, base: Path, adapter: Path) -> Iterator[Server]:
    """A server on BASE whose registry holds ADAPTER as alpha@v1.0.0, on the engine REQUEST.param names (a fresh
    transformers engine, or the session's vLLM one)."""
    registry = registry_with(tmp_path / "registry", {"alpha": [adapter]})
    engine = request.getfixturevalue("vllm_engine") if request.param == "vllm" else None
    with serving(engine, registry, base) as server:
        yield server


def tenants_cli(tenants_file: Path, *args: str) -> str:
    """Run `adapters tenants ARGS --file TENANTS_FILE` in this process (it must succeed); its output, a key for add."""
    from click.testing import CliRunner

    from adapterctl.cli import main

    result = CliRunner().invoke(main, ["tenants", *args, "--file", str(tenants_file)])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()
