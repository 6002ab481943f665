"""Engine replicas on Ray Serve side by side, in one run: 2 replicas of one thread each (routed by adapter version,
and routed anywhere) against 1 replica of two threads, on mixed workloads of several adapter counts.

Usage: python bench/replicas.py [--adapters 8 64] [--requests 64] [--tokens 64] [--max-loaded 8] [--json out.json]

Workload: the embedded SmolLM2-135M-Instruct (the default NF4 base), rank-16 adapters on every linear layer (random
weights), --requests concurrent streamed /v1/completions of exactly --tokens tokens, request i on adapter
i % adapters; a warm-up round, then a measured round. Each server is `adapters serve --replicas N --threads T` on a
local Ray cluster of its own, its adapters fetched from the registry's remote (a bare git repository and its DVC
folder made for the run), each replica keeping --max-loaded adapters. Figures: tokens/s, median time to first
token, and cold loads (an adapter version loaded on a replica for a request, from the ingress's /metrics) in the
measured round. Run it on a quiet machine: other processes' threads wreck every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.servers import free_port, started  # noqa: E402
from bench.workload import make_adapters, run_over_http  # noqa: E402
from adapterctl.core.base import ensure_embedded  # noqa: E402
from adapterctl.registry.repo import Registry  # noqa: E402
from adapterctl.registry.push import push  # noqa: E402
from adapterctl.registry.remotes import set_remote  # noqa: E402

SERVERS = {  # name -> (replicas, threads each, routing)
    "2x1-affinity": (2, 1, "affinity"),
    "2x1-random": (2, 1, "random"),
    "1x2": (1, 2, "affinity"),
}


def cold_loads(url: str) -> float:
    """Adapter versions loaded on a replica for a request so far, as the ingress counts them."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "adapters_replica_routes_total" and sample.labels.get("result") == "cold"
    )


def measure(name: str, registry: Path, names: list[str], counts: list[int], args: argparse.Namespace) -> dict:
    """Each adapter count's mixed workload on server NAME: a warm-up round, then a measured one."""
    replicas, threads, routing = SERVERS[name]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        *[sys.executable, "-m", "adapterctl", "serve", "--registry", str(registry), "--port", str(port)],
        *["--replicas", str(replicas), "--threads", str(threads), "--routing", routing],
        *["--max-batch", str(args.requests), "--max-rank", "16", "--max-loaded", str(args.max_loaded)],
    ]
    results = {}
    with started(command, url, registry.parent / f"{name}.log"):
        for count in counts:
            models = [names[i % count] for i in range(args.requests)]
            run_over_http(url, models, 4)
            before = cold_loads(url)
            run = run_over_http(url, models, args.tokens)
            run["cold_loads"] = cold_loads(url) - before
            run["ttft_p50"] = run["first_token"][len(run["first_token"]) // 2]
            results[count] = run
            print(f"{name}, {count} adapters: {run['tokens_per_s']:.0f} tok/s, cold loads {run['cold_loads']:.0f}")
    return results


def report(results: dict[str, Any], counts: list[int]) -> list[str]:
    """The figures of every server and workload, then, per workload, the ratios of item 6 side by side."""
    lines = [f"{'server':14}{'adapters':>9}{'tok/s':>9}{'TTFT p50':>10}{'cold loads':>12}"]
    for name, runs in results.items():
        for count, run in runs.items():
            rate, ttft, cold = run["tokens_per_s"], run["ttft_p50"], run["cold_loads"]
            lines.append(f"{name:14}{count:>9}{rate:>9.0f}{ttft:>9.2f}s{cold:>12.0f}")
    for count in counts:
        two, anywhere, one = (results[n][count] for n in ("2x1-affinity", "2x1-random", "1x2"))
        lines.append(
            f"{count} adapters: 2x1 / 1x2 throughput {two['tokens_per_s'] / one['tokens_per_s']:.2f}x, "
            f"TTFT {two['ttft_p50'] / one['ttft_p50']:.2f}x; cold loads affinity {two['cold_loads']:.0f} vs random "
            f"{anywhere['cold_loads']:.0f} ({anywhere['cold_loads'] - two['cold_loads']:.0f} avoided)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--max-loaded", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = ensure_embedded()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        specs = make_adapters(base, max(args.adapters), root / "adapters")
        registry, _ = Registry.init(root / "registry")
        for spec in specs:
            registry.add(spec.name, spec.path)
        set_remote(registry, "origin", str(root / "origin.git"), None, {}, create=True)
        push(registry, [])
        names = [spec.name for spec in specs]
        for name in SERVERS:
            results[name] = measure(name, registry.root, names, args.adapters, args)
    workload = f"{args.requests} requests x {args.tokens} tokens over HTTP, rank-16 adapters"
    print(f"\n{workload}, {args.max_loaded} per replica:")
    print("\n".join(report(results, args.adapters)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
