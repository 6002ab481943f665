"""Serving throughput with many adapters, measured side by side in one run and printed as ratios.

Usage: python bench/serve.py [--quantize nf4] [--tokens 64] [--requests 32] [--repeats 3] [--json out.json]

Adapters: rank 16 on every linear layer of the embedded SmolLM2-135M-Instruct, random weights (their
outputs are noise, which does not matter for speed; every request generates exactly --tokens tokens).
The engine is driven in-process, as the HTTP layer drives it: `await engine.load(adapter)`, then `engine.generate`.
  (a) --requests concurrent requests on 8 adapters (request i uses adapter i % 8) vs the same requests on the base;
  (b) that vs a naive server: PEFT with the 8 adapters loaded, `set_adapter` + `generate` one request at a time;
  (c) 100 requests on 100 distinct adapters with max_loaded 16 vs 100 requests on 8 adapters, --requests at a time;
  (d) cold-load time of an adapter (read + install) during (c); time to first token, p50/p95, during (a) and (c).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import make_adapters, prompt  # noqa: E402
from serve.engine import AdapterSpec, GenerateRequest, Sampling  # noqa: E402
from core.precision import quantization_config  # noqa: E402
from serve.transformers_engine import TransformersEngine  # noqa: E402
from core.base import ensure_embedded  # noqa: E402


async def serve(
    engine: TransformersEngine, adapters: list[AdapterSpec | None], tokens: int, concurrency: int
) -> dict[str, Any]:
    """Run one request per entry of ADAPTERS, CONCURRENCY at a time; tokens/s, cold loads, times to first token."""
    gate = asyncio.Semaphore(concurrency)
    loads: list[float] = []
    first_token: list[float] = []
    sampling = Sampling(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def one(i: int, adapter: AdapterSpec | None) -> int:
        async with gate:
            start = time.perf_counter()
            if adapter is not None:
                loaded_at = time.perf_counter()
                if await engine.load(adapter):
                    loads.append(time.perf_counter() - loaded_at)
            request = GenerateRequest(f"bench-{i}", tuple(engine.encode(prompt(i))), adapter, sampling)
            waited, generated = None, 0
            async for chunk in engine.generate(request):
                generated += len(chunk.token_ids)
                if waited is None and chunk.text:  # the first text a client sees
                    waited = time.perf_counter() - start
                    first_token.append(waited)
            return generated

    start = time.perf_counter()
    counts = await asyncio.gather(*[one(i, a) for i, a in enumerate(adapters)])
    return {"tokens_per_s": sum(counts) / (time.perf_counter() - start), "loads": loads, "first_token": first_token}


def naive(base: Path, quantize: str, adapters: list[AdapterSpec], tokens: int) -> float:
    """Tokens/s of PEFT with every adapter loaded, serving one request at a time with set_adapter + generate."""
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=quantization_config(quantize, torch.float32)
    )
    model = PeftModel.from_pretrained(model, adapters[0].path, adapter_name=adapters[0].name)
    for adapter in adapters[1:]:
        model.load_adapter(adapter.path, adapter_name=adapter.name)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model.eval()
    generated = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i, adapter in enumerate(adapters):
            model.set_adapter(adapter.name)
            ids = tokenizer(prompt(i), return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            generated += out.shape[1] - ids.shape[1]
    return generated / (time.perf_counter() - start)


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p95 in milliseconds."""
    ordered = sorted(values)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "int8", "none"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = ensure_embedded()
    results: dict[str, Any] = {"quantize": args.quantize, "tokens": args.tokens, "requests": args.requests}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, 100, Path(tmp))
        eight = adapters[:8]
        mixed_requests = [eight[i % 8] for i in range(args.requests)]

        engine = TransformersEngine(
            base, model_id="base", quantize=args.quantize, max_loaded=16, max_batch=args.requests
        )
        asyncio.run(serve(engine, [None] * 4, 4, 4))  # warm up
        base_rates, mixed_rates = [], []
        for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits both alike
            base_rates.append(
                asyncio.run(serve(engine, [None] * args.requests, args.tokens, args.requests))["tokens_per_s"]
            )
            mixed = asyncio.run(serve(engine, mixed_requests, args.tokens, args.requests))
            mixed_rates.append(mixed["tokens_per_s"])
        base_rate, mixed_rate = statistics.median(base_rates), statistics.median(mixed_rates)
        asyncio.run(engine.close())

        engine = TransformersEngine(
            base, model_id="base", quantize=args.quantize, max_loaded=16, max_batch=args.requests
        )
        many = asyncio.run(serve(engine, adapters, args.tokens, args.requests))
        few = asyncio.run(serve(engine, [eight[i % 8] for i in range(100)], args.tokens, args.requests))
        asyncio.run(engine.close())

        naive_rate = naive(base, args.quantize, eight, args.tokens)

    load_p50, load_p95 = percentiles(many["loads"])
    ttft_p50, ttft_p95 = percentiles(many["first_token"])
    mixed_ttft = percentiles(mixed["first_token"])
    results.update(
        base_tokens_per_s=base_rate,
        mixed_tokens_per_s=mixed_rate,
        naive_tokens_per_s=naive_rate,
        many_tokens_per_s=many["tokens_per_s"],
        few_tokens_per_s=few["tokens_per_s"],
        cold_loads=len(many["loads"]),
        cold_load_ms=[load_p50, load_p95],
        first_token_ms=[ttft_p50, ttft_p95],
        mixed_first_token_ms=list(mixed_ttft),
    )
    rows = [
        ("(a) 8 adapters mixed vs base", f"{mixed_rate:.0f} vs {base_rate:.0f} tok/s", mixed_rate / base_rate, "0.9"),
        (
            "(b) vs naive set_adapter server",
            f"{mixed_rate:.0f} vs {naive_rate:.0f} tok/s",
            mixed_rate / naive_rate,
            "5",
        ),
        (
            "(c) 100 adapters, max_loaded 16, vs 8",
            f"{many['tokens_per_s']:.0f} vs {few['tokens_per_s']:.0f} tok/s",
            many["tokens_per_s"] / few["tokens_per_s"],
            "0.8",
        ),
    ]
    print(f"\nquantize={args.quantize}, {args.requests} concurrent requests x {args.tokens} tokens")
    print(f"{'measurement':40} {'figures':26} {'ratio':>7}  target")
    for name, figures, ratio, target in rows:
        print(f"{name:40} {figures:26} {ratio:6.2f}x  >= {target}")
    print(f"(d) cold load p50/p95: {load_p50:.0f} / {load_p95:.0f} ms over {len(many['loads'])} loads")
    print(f"    time to first token p50/p95: {ttft_p50:.0f} / {ttft_p95:.0f} ms during (c), 100 adapters;")
    print(f"    {mixed_ttft[0]:.0f} / {mixed_ttft[1]:.0f} ms during (a), {args.requests} requests arriving at once")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
