"""Serving throughput with many adapters, measured side by side in one run and printed as ratios.

Usage: python bench/serve.py [--quantize nf4] [--tokens 64] [--requests 32] [--repeats 3] [--quick] [--json out.json]

Adapters: rank 16 on every linear layer of the embedded SmolLM2-135M-Instruct, random weights (their
outputs are noise, which does not matter for speed; every request generates exactly --tokens tokens).
The engine is driven in-process, as the HTTP layer drives it: `await engine.load(adapter)`, then `engine.generate`.
  (a) --requests concurrent requests on 8 adapters (request i uses adapter i % 8) vs the same requests on the base;
  (b) that vs a naive server: PEFT with the 8 adapters loaded, `set_adapter` + `generate` one request at a time;
  (c) 100 requests on 100 distinct adapters with max_loaded 16 vs 100 requests on 8 adapters, --requests at a time;
  (d) cold-load time of an adapter during (c): its read + install, and `load` returning (which also waits for a step
      boundary and for the loads asked before it); time to first token, p50/p95, during (a) and (c);
  (e) memory: RSS before, at the peak of and after a 1,900-token request alone, RSS per 1k cached tokens, and the
      cache's bytes per token held with 16 short streams running beside it;
  (f) inter-token latency p50/p95 of 16 running streams: alone, while a 1,900-token prompt is prefilled in chunks,
      and while it is prefilled in one pass (--prefill-chunk 0);
  (g) (a)'s base and mixed runs again while a competing CPU-bound process (a busy Python loop) runs, against the ideal
      of (cores - 1) / cores;
  (h) when vLLM is installed: the same workload over HTTP on `adapters serve` and on vLLM's own server, base and
      mixed, without and with the competing process (bench/servers.py starts them).
--quick skips (b), (c) and (h), the long parts.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterctl.core.threads import configure_openmp  # noqa: E402

configure_openmp()  # as `adapters serve` does, before torch loads

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.servers import prepared, serving  # noqa: E402
from bench.workload import make_adapters, prompt, run_over_http  # noqa: E402
from adapterctl.serve.engines.base import AdapterSpec, GenerateRequest, Sampling  # noqa: E402
from adapterctl.core.precision import quantization_config  # noqa: E402
from adapterctl.core.memory import resident_bytes, trim  # noqa: E402
from adapterctl.serve.engines.transformers.engine import TransformersEngine  # noqa: E402
from adapterctl.core.base import ensure_embedded  # noqa: E402


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


def long_prompt(engine: TransformersEngine, tokens: int = 1900) -> tuple[int, ...]:
    """A prompt of exactly TOKENS tokens."""
    ids = engine.encode(" ".join(prompt(i) for i in range(tokens // 10)))
    assert len(ids) >= tokens, len(ids)
    return tuple(ids[:tokens])


def idle(engine: TransformersEngine) -> None:
    """Wait until the engine holds no rows (a generation's last chunk comes just before its row leaves)."""
    while engine._runner.held():
        time.sleep(0.01)


def memory(engine: TransformersEngine) -> dict[str, Any]:
    """RSS before, at the peak of and after one 1,900-token request alone; the cache's bytes at the peak."""
    idle(engine)
    trim()  # what earlier runs freed goes back first, so that "before" is where the process stands
    before, peak, cache_peak, done = resident_bytes(), [0], [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0], cache_peak[0] = max(peak[0], resident_bytes()), max(cache_peak[0], engine._runner.cache.nbytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    sampling = Sampling(max_tokens=16, temperature=0, ignore_eos=True)

    async def run() -> None:
        async for _ in engine.generate(GenerateRequest("bench-long", long_prompt(engine), None, sampling)):
            pass

    asyncio.run(run())
    idle(engine)
    done.set()
    sampler.join()
    time.sleep(0.5)
    after = resident_bytes()
    return {"before": before, "peak": peak[0], "after": after, "cache_peak": cache_peak[0], "tokens": 1900 + 16}


async def streams(engine: TransformersEngine, count: int, tokens: int, long: bool) -> dict[str, Any]:
    """COUNT base streams of TOKENS tokens; when LONG, a 1,900-token prompt arrives once every stream has 8 tokens.

    Returns the gaps between consecutive tokens of the streams (all of them, or those that overlap the time from the
    long prompt's arrival to its first token), and the cache's bytes per token held when that first token came.
    """
    sampling = Sampling(max_tokens=tokens, temperature=0, ignore_eos=True)
    gaps: list[tuple[float, float]] = []  # (when it ended, gap)
    going = [0] * count
    window: list[float] = []
    held: list[float] = []

    async def one(i: int) -> None:
        last = None
        async for _ in engine.generate(GenerateRequest(f"itl-{i}", tuple(engine.encode(prompt(i))), None, sampling)):
            now = time.perf_counter()
            if last is not None:
                gaps.append((now, now - last))
            last, going[i] = now, going[i] + 1

    async def arrive() -> None:
        while min(going) < 8:
            await asyncio.sleep(0.005)
        window.append(time.perf_counter())
        request = GenerateRequest("itl-long", long_prompt(engine), None, Sampling(max_tokens=1, temperature=0))
        async for _ in engine.generate(request):
            window.append(time.perf_counter())
            cached = sum(row.length for row in list(engine._runner.rows))  # the long row joined them
            held.append(engine._runner.cache.nbytes() / cached)

    await asyncio.gather(*[one(i) for i in range(count)], *([arrive()] if long else []))
    if long:
        during = [gap for end, gap in gaps if end > window[0] and end - gap < window[1]]
        return {"gaps": during, "bytes_per_token": held[0], "long_first_token": window[1] - window[0]}
    return {"gaps": [gap for _, gap in gaps]}


def timed_loads(engine: TransformersEngine) -> dict[str, float]:
    """Seconds each adapter's read and install take in ENGINE from now on, by key: a cold load's own work."""
    spent: dict[str, float] = {}

    def timed(work: Any, key: Callable[..., str]) -> Any:
        def run(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return work(*args)
            finally:
                name = key(*args)
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

        return run

    engine._read = timed(engine._read, lambda spec: spec.key)
    engine._slots._install = timed(engine._slots._install, lambda weights, slot: weights.key)
    return spent


@contextmanager
def competing() -> Iterator[None]:
    """A CPU-bound process (a busy Python loop) running on the machine while the block runs."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(5)  # the engine looks at the machine's load every 2 s
        yield
    finally:
        busy.kill()
        busy.wait()
        time.sleep(5)  # and takes every core again only after it has seen them free


def peer(base: Path, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """(h): bench/servers.py's HTTP workload on `adapters serve` and vLLM's server, without and with competition."""
    options = argparse.Namespace(adapters=8, requests=args.requests, tokens=args.tokens)
    specs, registry = prepared(base, 8, root)
    results: dict[str, Any] = {}
    for name in ("transformers-nf4", "vllm-server"):
        with serving(name, base, registry, specs, options) as (url, model, mixed):
            for loaded in (False, True):
                with competing() if loaded else nullcontext():
                    results[f"{name}{'-loaded' if loaded else ''}"] = {
                        "base": run_over_http(url, [model] * args.requests, args.tokens)["tokens_per_s"],
                        "mixed": run_over_http(url, mixed, args.tokens)["tokens_per_s"],
                    }
    return results


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
    parser.add_argument("--quick", action="store_true", help="skip (b), (c) and (h)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = ensure_embedded()
    cores = len(os.sched_getaffinity(0))
    results: dict[str, Any] = {"quantize": args.quantize, "tokens": args.tokens, "requests": args.requests}
    results["load_at_start"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, 100, Path(tmp) / "adapters")
        eight = adapters[:8]
        mixed_requests = [eight[i % 8] for i in range(args.requests)]

        engine = TransformersEngine(
            base, model_id="base", quantize=args.quantize, max_loaded=16, max_batch=args.requests + 1
        )
        asyncio.run(serve(engine, [None] * 4, 4, 4))  # warm up
        memory_run = memory(engine)
        itl: dict[str, list[dict[str, Any]]] = {"alone": [], "chunked": [], "whole": []}
        for _ in range(args.repeats):
            for kind in itl:
                engine._runner.prefill_chunk = 0 if kind == "whole" else engine.prefill_chunk
                itl[kind].append(asyncio.run(streams(engine, 16, 96, long=kind != "alone")))
        engine._runner.prefill_chunk = engine.prefill_chunk
        rates: dict[str, list[float]] = {"base": [], "mixed": [], "base-loaded": [], "mixed-loaded": []}
        threads: list[int] = []
        mixed: dict[str, Any] = {}
        for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits all alike
            for loaded in (False, True):
                with competing() if loaded else nullcontext():
                    suffix = "-loaded" if loaded else ""
                    run = asyncio.run(serve(engine, [None] * args.requests, args.tokens, args.requests))
                    rates[f"base{suffix}"].append(run["tokens_per_s"])
                    run = asyncio.run(serve(engine, mixed_requests, args.tokens, args.requests))
                    rates[f"mixed{suffix}"].append(run["tokens_per_s"])
                    mixed = run if not loaded else mixed
                    threads.append(engine.threads.threads)
        rate = {kind: statistics.median(values) for kind, values in rates.items()}
        asyncio.run(engine.close())

        if not args.quick:
            engine = TransformersEngine(
                base, model_id="base", quantize=args.quantize, max_loaded=16, max_batch=args.requests
            )
            work = timed_loads(engine)
            many = asyncio.run(serve(engine, adapters, args.tokens, args.requests))
            few = asyncio.run(serve(engine, [eight[i % 8] for i in range(100)], args.tokens, args.requests))
            asyncio.run(engine.close())
            naive_rate = naive(base, args.quantize, eight, args.tokens)
            if importlib.util.find_spec("vllm") is not None:
                try:
                    results["peer"] = peer(base, args, Path(tmp) / "peer")
                except SystemExit as exc:  # a server that did not start: the other figures still count
                    print(f"(h) not measured: {exc}")
    results["load_at_end"] = os.getloadavg()

    mixed_ttft = percentiles(mixed["first_token"])
    gaps = {kind: percentiles([g for run in runs for g in run["gaps"]]) for kind, runs in itl.items()}
    worst = {kind: max(g for run in runs for g in run["gaps"]) * 1000 for kind, runs in itl.items()}
    mib, tokens_k = 1024 * 1024, memory_run["tokens"] / 1000
    per_k = (memory_run["peak"] - memory_run["before"]) / tokens_k / mib
    cache_per_k = memory_run["cache_peak"] / tokens_k / mib
    held_per_k = statistics.median(run["bytes_per_token"] for run in itl["chunked"]) * 1000 / mib
    results.update(
        rates=rates,
        tokens_per_s=rate,
        threads_loaded=threads,
        mixed_first_token_ms=list(mixed_ttft),
        memory=memory_run,
        inter_token_ms={kind: list(values) for kind, values in gaps.items()},
        inter_token_worst_ms=worst,
        long_first_token_s={kind: [run["long_first_token"] for run in itl[kind]] for kind in ("chunked", "whole")},
    )
    ideal = (cores - 1) / cores
    rows = [
        (
            "(a) 8 adapters mixed vs base",
            f"{rate['mixed']:.0f} vs {rate['base']:.0f} tok/s",
            rate["mixed"] / rate["base"],
            ">= 0.92",
        ),
        *(
            [
                (
                    "(b) vs naive set_adapter server",
                    f"{rate['mixed']:.0f} vs {naive_rate:.0f} tok/s",
                    rate["mixed"] / naive_rate,
                    ">= 5",
                ),
                (
                    "(c) 100 adapters, max_loaded 16, vs 8",
                    f"{many['tokens_per_s']:.0f} vs {few['tokens_per_s']:.0f} tok/s",
                    many["tokens_per_s"] / few["tokens_per_s"],
                    ">= 0.85",
                ),
            ]
            if not args.quick
            else []
        ),
        (
            "(e) RSS after / before a 1,900-token request",
            f"{memory_run['after'] / mib:.0f} vs {memory_run['before'] / mib:.0f} MiB",
            memory_run["after"] / memory_run["before"],
            "<= 1.10",
        ),
        (
            "    RSS at its peak / before",
            f"{memory_run['peak'] / mib:.0f} vs {memory_run['before'] / mib:.0f} MiB",
            memory_run["peak"] / memory_run["before"],
            "",
        ),
        (
            "    cache bytes per token held: 16 short + 1 long / long alone",
            f"{held_per_k:.0f} vs {cache_per_k:.0f} MiB/1k",
            held_per_k / cache_per_k,
            "",
        ),
        (
            "(f) inter-token p95: long prompt chunked / none",
            f"{gaps['chunked'][1]:.0f} vs {gaps['alone'][1]:.0f} ms",
            gaps["chunked"][1] / gaps["alone"][1],
            "",
        ),
        (
            "    inter-token p95: long prompt in one pass / none",
            f"{gaps['whole'][1]:.0f} vs {gaps['alone'][1]:.0f} ms",
            gaps["whole"][1] / gaps["alone"][1],
            "",
        ),
        *[
            (
                f"(g) {kind} with a competing process / without",
                f"{rate[kind + '-loaded']:.0f} vs {rate[kind]:.0f} tok/s",
                rate[kind + "-loaded"] / rate[kind],
                f">= {ideal:.2f}",
            )
            for kind in ("base", "mixed")
        ],
    ]
    peers = results.get("peer", {})
    for suffix in ("", "-loaded") if peers else ():
        ours, theirs = peers[f"transformers-nf4{suffix}"], peers[f"vllm-server{suffix}"]
        for kind in ("base", "mixed"):
            name = f"(h) HTTP {kind}{', competing process' if suffix else ''}: ours / vLLM"
            rows.append((name, f"{ours[kind]:.0f} vs {theirs[kind]:.0f} tok/s", ours[kind] / theirs[kind], ""))
    print(f"\nquantize={args.quantize}, {args.requests} concurrent requests x {args.tokens} tokens, {cores} cores")
    print(f"load average at start {results['load_at_start'][0]:.2f}, at end {results['load_at_end'][0]:.2f}")
    print(f"{'measurement':58} {'figures':26} {'ratio':>7}  target")
    for name, figures, ratio, target in rows:
        print(f"{name:58} {figures:26} {ratio:6.2f}x  {target}")
    if not args.quick:
        load_p50, load_p95 = percentiles(many["loads"])
        ttft_p50, ttft_p95 = percentiles(many["first_token"])
        work_p50, work_p95 = percentiles(list(work.values()))
        print(f"(d) cold load, read + install: p50/p95 {work_p50:.0f} / {work_p95:.0f} ms over {len(work)} adapters")
        print(f"    `load` returning (waits for a step boundary, earlier loads): {load_p50:.0f} / {load_p95:.0f} ms")
        print(f"    time to first token p50/p95: {ttft_p50:.0f} / {ttft_p95:.0f} ms during (c), 100 adapters;")
    print(f"    {mixed_ttft[0]:.0f} / {mixed_ttft[1]:.0f} ms during (a), {args.requests} requests arriving at once")
    print(f"(e) RSS per 1k cached tokens: {per_k:.0f} MiB (the cache's own storage: {cache_per_k:.0f} MiB)")
    print(
        "(f) inter-token p50/p95 of 16 streams: "
        + "; ".join(f"{kind} {p50:.0f} / {p95:.0f} ms (worst {worst[kind]:.0f})" for kind, (p50, p95) in gaps.items())
        + f"; chunk {engine.prefill_chunk} tokens"
    )
    first = {kind: statistics.median(run["long_first_token"] for run in itl[kind]) for kind in ("chunked", "whole")}
    print(
        f"    the long prompt's first token after {first['chunked']:.1f} s chunked, {first['whole']:.1f} s in one pass"
    )
    print(f"(g) threads chosen under competition: {threads[1::2]}, without: {threads[0::2]}")
    for name, run in results.get("peer", {}).items():
        print(f"(h) {name}: base {run['base']:.0f}, mixed {run['mixed']:.0f} tok/s over HTTP")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
