"""Tenants' fair share over HTTP: one tenant floods `adapters serve`, another sends short streams.

Usage: python bench/tenants.py [--quick] [--prompts 1000] [--n 2] [--streams 40] [--json out.json]

`adapters serve` (transformers engine, its default NF4 base) on the embedded SmolLM2-135M-Instruct, with a tenants file
of two tenants, each on its own rank-16 adapter:
  flood  a completions list of --prompts prompts x --n choices (its max_concurrent allows exactly that many
         generations), echo on, 1 token each (as a log-likelihood evaluation sends them, less the log-probabilities),
         beside 3 slow readers (streams of 64 tokens, read one event per 0.2 s);
  short  --streams streamed completions of 5 tokens, one sent every second (each whether or not the last has ended).
Measured: short's time to first token alone and while flood floods (p95, target: at most 2x alone); flood's tokens
served per second (prompt tokens of each generation, and generated ones) alone and while short runs (target: at least
0.9x of alone), and alone against the whole server's (flood's and short's) while both run (target: at least 0.9x of
that: a tenant alone gets every slot). With one first-in-first-out queue, short would wait for the rest of the
list: up to its seconds, printed too.
Then the same server without --tenants (one caller, no fair share) runs short alone and flood alone again: what fair
share costs a tenant alone.
--quick: 200 prompts, n 1, 10 streams (under 3 minutes on 2 quiet cores).
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.servers import free_port, prepared, started  # noqa: E402
from bench.workload import prompt  # noqa: E402
from adapterctl.core.base import ensure_embedded  # noqa: E402
from adapterctl.serve.api.tenants import add_tenant  # noqa: E402

SLOW_READERS, SLOW_TOKENS, SLOW_PAUSE = 3, 64, 0.2
SHORT_TOKENS = 5


async def stream(client: httpx.AsyncClient, key: str, model: str, tokens: int, pause: float = 0.0) -> dict[str, Any]:
    """One streamed completion: seconds to its first token and to its end, and its tokens (prompt and generated).

    Every token is scored (`logprobs: 0`), so that each one is an event: a token that adds no text (the random
    adapters' first token here is `<|im_end|>`, kept by ignore_eos) would otherwise go out with the next one.
    """
    body = {
        "model": model,
        "prompt": prompt(0),
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, first, served = time.perf_counter(), None, 0
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and first is None:
                first = time.perf_counter() - sent
            if event.get("usage"):
                served = event["usage"]["total_tokens"]
            await asyncio.sleep(pause)  # a slow reader: the server must not hold a slot for it
    return {"first_token": first, "seconds": time.perf_counter() - sent, "tokens": served}


async def flood(client: httpx.AsyncClient, key: str, model: str, prompts: int, n: int) -> dict[str, Any]:
    """The flooding tenant's list beside its slow readers: seconds and tokens served (each generation's prompt too)."""
    slow = [
        asyncio.ensure_future(stream(client, key, model, SLOW_TOKENS, pause=SLOW_PAUSE)) for _ in range(SLOW_READERS)
    ]
    body = {
        "model": model,
        "prompt": [prompt(i) for i in range(prompts)],
        "n": n,
        "echo": True,
        "max_tokens": 1,
        "temperature": 0,
    }
    sent = time.perf_counter()
    response = await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    seconds = time.perf_counter() - sent
    await asyncio.gather(*slow)
    usage = response.json()["usage"]
    return {"seconds": seconds, "tokens": usage["prompt_tokens"] * n + usage["completion_tokens"]}


async def shorts(client: httpx.AsyncClient, key: str, model: str, count: int, until: asyncio.Future | None) -> list:
    """COUNT short streams, one sent every second (none once UNTIL is done, if given)."""
    sent = []
    for _ in range(count):
        if until is not None and until.done():
            break
        sent.append(asyncio.ensure_future(stream(client, key, model, SHORT_TOKENS)))
        await asyncio.sleep(1)
    return list(await asyncio.gather(*sent))


async def measure(url: str, keys: dict[str, str], models: dict[str, str], args: argparse.Namespace, both: bool) -> dict:
    """Short alone, flood alone, then (if BOTH) both at once."""
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        for who in keys:  # warm-up: each adapter loaded, each code path run once
            await stream(client, keys[who], models[who], 4)
        alone = await shorts(client, keys["short"], models["short"], args.streams, None)
        flood_alone = await flood(client, keys["flood"], models["flood"], args.prompts, args.n)
        if not both:
            return {"short_alone": alone, "flood_alone": flood_alone}
        flooding = asyncio.ensure_future(flood(client, keys["flood"], models["flood"], args.prompts, args.n))
        await asyncio.sleep(1)  # the list is in: its generations wait for the engine
        during = await shorts(client, keys["short"], models["short"], args.streams, flooding)
        flood_busy = await flooding
    return {"short_alone": alone, "short_during": during, "flood_alone": flood_alone, "flood_busy": flood_busy}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="200 prompts, n 1, 10 streams")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.n, args.streams = 200, 1, 10
    base = ensure_embedded()
    results: dict[str, Any] = {"load_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        specs, registry = prepared(base, 2, root)
        models = {"flood": specs[0].name, "short": specs[1].name}
        tenants = root / "tenants.yaml"
        keys = {
            "flood": add_tenant(tenants, "flood", [models["flood"]], args.prompts * args.n + SLOW_READERS, None),
            "short": add_tenant(tenants, "short", [models["short"]], None, None),
        }
        command = [sys.executable, "-m", "adapterctl", "serve", "--registry", str(registry), "--max-rank", "16"]
        for mode, options in (("fair", ["--tenants", str(tenants)]), ("open", [])):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with started([*command, *options, "--port", str(port)], url, root / f"server-{mode}.log"):
                measured = asyncio.run(measure(url, keys, models, args, both=mode == "fair"))
            results.update(measured if mode == "fair" else {f"open_{k}": v for k, v in measured.items()})
    results["load_at_end"] = os.getloadavg()
    if not results["short_during"]:
        raise SystemExit("The flood ended before short sent a stream: raise --prompts or --n.")
    alone = p95([r["first_token"] for r in results["short_alone"]])
    during = p95([r["first_token"] for r in results["short_during"]])
    flood_alone, flood_busy, flood_open = results["flood_alone"], results["flood_busy"], results["open_flood_alone"]
    open_alone = p95([r["first_token"] for r in results["open_short_alone"]])
    open_rate = flood_open["tokens"] / flood_open["seconds"]
    alone_rate = flood_alone["tokens"] / flood_alone["seconds"]
    busy_rate = flood_busy["tokens"] / flood_busy["seconds"]
    short_rate = sum(r["tokens"] for r in results["short_during"]) / flood_busy["seconds"]
    generations = args.prompts * args.n
    print(f"\nflood: {args.prompts} prompts x n={args.n} ({generations} generations, echo, 1 token each)")
    print(f"       + {SLOW_READERS} slow readers; short: {SHORT_TOKENS}-token streams, one a second")
    print(f"load average at start {results['load_at_start'][0]:.2f}, at end {results['load_at_end'][0]:.2f}")
    print(f"{'measurement':52} {'figures':30} {'ratio':>7}  target")
    rows = [
        (
            "short's time to first token p95: flooded / alone",
            f"{during * 1000:.0f} vs {alone * 1000:.0f} ms ({len(results['short_during'])} streams)",
            during / alone,
            "<= 2",
        ),
        (
            "flood's tok/s alone / the server's while both run",
            f"{alone_rate:.0f} vs {busy_rate + short_rate:.0f} tok/s",
            alone_rate / (busy_rate + short_rate),
            ">= 0.9",
        ),
        (
            "flood's tok/s while short runs / alone",
            f"{busy_rate:.0f} vs {alone_rate:.0f} tok/s",
            busy_rate / alone_rate,
            ">= 0.9",
        ),
        (
            "flood alone, tok/s: fair share / without tenants",
            f"{alone_rate:.0f} vs {open_rate:.0f} tok/s",
            alone_rate / open_rate,
            "~ 1",
        ),
        (
            "short alone, first token p95: fair share / without",
            f"{alone * 1000:.0f} vs {open_alone * 1000:.0f} ms",
            alone / open_alone,
            "~ 1",
        ),
    ]
    for name, figures, ratio, target in rows:
        print(f"{name:52} {figures:30} {ratio:6.2f}x  {target}")
    print(f"flood's list took {flood_alone['seconds']:.1f} s alone, {flood_busy['seconds']:.1f} s beside short")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
