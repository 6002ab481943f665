"""The serving benchmarks' workload: rank-16 adapters on every linear layer, prompts, timed HTTP requests."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapterctl.core.base import fingerprint
from adapterctl.serve.engines.base import AdapterSpec

WORDS = ["cat", "dog", "fox", "owl", "bee", "elk", "yak", "ant"]


def make_adapters(base: Path, count: int, folder: Path) -> list[AdapterSpec]:
    """COUNT rank-16 all-linear adapters: one made by PEFT, the rest its copies with other random weights.

    Each records the base's fingerprint in lineage.json, so a registry takes it and a server serves it.
    """
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    first = folder / "a000"
    get_peft_model(model, config).save_pretrained(first)
    tensors = load_file(first / "adapter_model.safetensors")
    lineage = json.dumps({"base_model": {"name": base.name, "fingerprint": fingerprint(base)}})
    specs = []
    for i in range(count):
        out = folder / f"a{i:03d}"
        if i:
            out.mkdir()
            (out / "adapter_config.json").write_text((first / "adapter_config.json").read_text())
            save_file({k: torch.randn_like(v) * v.std() for k, v in tensors.items()}, out / "adapter_model.safetensors")
        (out / "lineage.json").write_text(lineage)
        specs.append(AdapterSpec(out.name, "v1.0.0", out))
    return specs


def prompt(i: int) -> str:
    return f"Tell me a short story about a {WORDS[i % len(WORDS)]} who lives in house number {i}."


async def over_http(url: str, models: list[str], tokens: int) -> dict[str, Any]:
    """One /v1/completions request per entry of MODELS, all at once; tokens/s and times to first token."""
    first: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:

        async def one(i: int, model: str) -> int:
            body = {
                "model": model,
                "prompt": prompt(i),
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            sent, generated, timed = time.perf_counter(), 0, False
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices") and not timed:  # the first text the client sees
                        first.append(time.perf_counter() - sent)
                        timed = True
                    if event.get("usage"):
                        generated = event["usage"]["completion_tokens"]
            return generated

        start = time.perf_counter()
        counts = await asyncio.gather(*[one(i, m) for i, m in enumerate(models)])
    seconds = time.perf_counter() - start
    return {"tokens_per_s": sum(counts) / seconds, "first_token": sorted(first)}


def run_over_http(url: str, models: list[str], tokens: int) -> dict[str, Any]:
    """`over_http` from synchronous code."""
    return asyncio.run(over_http(url, models, tokens))
