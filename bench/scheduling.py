"""No request stalls the others: the prefill budget and block-aware admission, measured side by side in one run.

Usage: python bench/scheduling.py [--quantize nf4] [--budgets 64,128,256,512] [--long 48] [--repeats 2] [--json F]

The embedded SmolLM2-135M-Instruct, driven in-process as the HTTP layer drives it.
  (a) 16 running streams; once each has 8 tokens, a burst of 32 prompts of about 60 tokens arrives at once. The
      running streams' inter-token gaps (p50, p95, max) while the burst is prefilled (and before it), and the burst's
      first tokens, with each --max-batched-tokens budget against no budget (the whole burst in one pass, as before
      the budget); the median of --repeats runs of each, interleaved.
  (b) --long requests of 1,771-token prompts (max_tokens 16), then a 3-token request: its time to first token with
      admission by KV blocks (the default --kv-cache-gb) against admission by rows alone (a cache that never binds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterctl.core.threads import configure_openmp  # noqa: E402

configure_openmp()  # as `adapters serve` does, before torch loads

from bench.workload import prompt  # noqa: E402
from adapterctl.core.base import ensure_embedded  # noqa: E402
from adapterctl.serve.engines.base import GenerateRequest, Sampling  # noqa: E402
from adapterctl.serve.engines.transformers.engine import KV_CACHE_GB, TransformersEngine  # noqa: E402

WAIT = 120.0  # seconds (b) waits for the short request's first token


def ms(values: list[float]) -> dict[str, float]:
    """p50, p95 and max in milliseconds."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {"p50": statistics.median(ordered) * 1000, "p95": p95 * 1000, "max": ordered[-1] * 1000}


async def burst(engine: TransformersEngine) -> dict[str, Any]:
    """(a) once: the running streams' gaps while the burst is prefilled, and the burst's times to first token."""
    running = Sampling(max_tokens=400, temperature=0, ignore_eos=True)
    short = Sampling(max_tokens=4, temperature=0, ignore_eos=True)
    gaps: list[tuple[float, float, int]] = []  # (when it ended, gap, tokens before it)
    going, firsts, window = [0] * 16, [], []

    async def stream(i: int) -> None:
        last = None
        request = GenerateRequest(f"run-{i}", tuple(engine.encode(prompt(i))), None, running)
        async for _ in engine.generate(request):
            now = time.perf_counter()
            if last is not None:
                gaps.append((now, now - last, going[i]))
            last, going[i] = now, going[i] + 1
            if window and len(window) > 1 and now > window[1]:
                return  # the burst is in: this stream has given what it measures

    async def arrival(i: int, started: float) -> None:
        ids = tuple(engine.encode(" ".join(prompt(i + k) for k in range(3))))
        async for _ in engine.generate(GenerateRequest(f"burst-{i}", ids, None, short)):
            if len(firsts) < i + 1:
                firsts.append(time.perf_counter() - started)

    async def arrive() -> None:
        while min(going) < 8:
            await asyncio.sleep(0.005)
        window.append(time.perf_counter())
        await asyncio.gather(*(arrival(i, window[0]) for i in range(32)))
        window.append(time.perf_counter())

    await asyncio.gather(*(stream(i) for i in range(16)), arrive())
    during = [gap for end, gap, _ in gaps if end > window[0] and end - gap < window[1]]
    before = [gap for end, gap, number in gaps if end < window[0] and number >= 4]  # all 16 running, no burst yet
    first = {"p50": statistics.median(firsts), "last": max(firsts)}
    return {"running_gaps_ms": ms(during), "alone_gaps_ms": ms(before), "burst_first_token_s": first}


async def behind(engine: TransformersEngine, long: int) -> float | None:
    """(b) once: seconds to the 3-token request's first token behind LONG long prompts (None: not within WAIT)."""
    ids = tuple(engine.encode(" ".join(prompt(i) for i in range(200))))[:1771]
    sampling = Sampling(max_tokens=16, temperature=0, ignore_eos=True)

    async def drain(request: GenerateRequest) -> None:
        async for _ in engine.generate(request):
            pass

    tasks = [asyncio.ensure_future(drain(GenerateRequest(f"long-{i}", ids, None, sampling))) for i in range(long)]
    while engine.status().running + engine.status().waiting < long:
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    short = GenerateRequest("short", tuple(engine.encode("Hi")[:3]), None, Sampling(max_tokens=3, temperature=0))
    try:
        async with asyncio.timeout(WAIT):
            async for _ in engine.generate(short):
                return time.perf_counter() - started
    except TimeoutError:
        return None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while engine.status().running or engine.status().waiting:
            await asyncio.sleep(0.05)
    return None


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure of RUNS (nested dicts of numbers alike), its median over them."""
    return {
        key: median([run[key] for run in runs]) if isinstance(value, dict) else statistics.median(r[key] for r in runs)
        for key, value in runs[0].items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "int8", "none"])
    parser.add_argument("--budgets", default="64,128,256,512")
    parser.add_argument("--long", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = ensure_embedded()
    results: dict[str, Any] = {"quantize": args.quantize, "load_at_start": os.getloadavg()}

    engine = TransformersEngine(base, model_id="base", quantize=args.quantize, max_batch=48)
    asyncio.run(burst(engine))  # warm up
    runner, chunk = engine._runner, engine.prefill_chunk
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits every budget alike
        for budget in [None, *(int(b) for b in args.budgets.split(","))]:
            # No budget: prompts whole, all in one pass, as before the budget.
            runner.max_batched_tokens, runner.prefill_chunk = (budget, chunk) if budget else (1 << 30, 0)
            runs.setdefault(str(budget or "none"), []).append(asyncio.run(burst(engine)))
    asyncio.run(engine.close())
    results["burst"] = {budget: median(found) for budget, found in runs.items()}

    results["behind"] = {}
    for name, gb in (("blocks", KV_CACHE_GB), ("rows", 64.0)):
        engine = TransformersEngine(base, model_id="base", quantize=args.quantize, max_batch=32, kv_cache_gb=gb)
        results["behind"][name] = asyncio.run(behind(engine, args.long))
        asyncio.run(engine.close())
    results["load_at_end"] = os.getloadavg()

    none = results["burst"]["none"]["running_gaps_ms"]
    alone = statistics.median(run["alone_gaps_ms"]["p50"] for run in results["burst"].values())
    print(f"(a) 16 running streams while 32 prompts of ~60 tokens arrive; load {results['load_at_start'][0]:.1f}")
    print(f"    before the burst: gap p50 {alone:.0f}ms (median over the runs)")
    print("    budget   gap p50   gap p95   gap max   p95 vs none   burst first token p50 / last")
    for budget, run in results["burst"].items():
        gaps, first = run["running_gaps_ms"], run["burst_first_token_s"]
        print(
            f"    {budget:>6}  {gaps['p50']:7.0f}ms {gaps['p95']:7.0f}ms {gaps['max']:7.0f}ms"
            f"   {gaps['p95'] / none['p95']:9.2f}x   {first['p50']:6.2f}s / {first['last']:.2f}s"
        )
    blocks, rows = results["behind"]["blocks"], results["behind"]["rows"]
    shown = {k: f"{v:.2f}s" if v is not None else f"none within {WAIT:.0f}s" for k, v in results["behind"].items()}
    print(
        f"(b) a 3-token request behind {args.long} prompts of 1,771 tokens: first token after {shown['blocks']} "
        f"admitted by blocks ({KV_CACHE_GB:g} GiB), {shown['rows']} by rows alone",
        end="",
    )
    print(f" ({(WAIT if rows is None else rows) / blocks:.0f}x{'+' if rows is None else ''})" if blocks else ".")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
