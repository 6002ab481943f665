"""Prometheus metrics of the server (exposed at /metrics): the HTTP layer's own, and each engine's status read at
every scrape, so every engine reports the same figures."""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from adapterctl.serve.engines.base import Chunk, Engine, EngineStatus, GenerateRequest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("adapters_requests_total", "HTTP requests answered.", ["endpoint", "status"])
TOKENS = Counter("adapters_tokens_total", "Tokens processed.", ["kind"])  # kind: prompt | completion
REQUEST_SECONDS = Histogram(
    "adapters_request_seconds", "Time from request to last byte.", ["endpoint"], buckets=_LATENCY
)
FIRST_TOKEN_SECONDS = Histogram("adapters_time_to_first_token_seconds", "Time to the first token.", buckets=_LATENCY)
ADAPTER_LOAD_SECONDS = Histogram(
    "adapters_adapter_load_seconds", "Time a request waited for its adapter to load.", buckets=_LATENCY
)
CACHE_HITS = Counter("adapters_adapter_cache_hits_total", "Requests whose adapter was already loaded.")

# Per adapter version and tenant: label values are registry versions and tenants-file names, both bounded.
MODEL_REQUESTS = Counter("adapters_model_requests_total", "Generation requests answered.", ["model", "tenant"])
MODEL_TOKENS = Counter("adapters_model_tokens_total", "Tokens processed.", ["model", "tenant", "kind"])
# Requests for a model answered with an error status (4xx or 5xx), counted as the HTTP layer answers them.
MODEL_ERRORS = Counter(
    "adapters_model_errors_total", "Generation requests answered with an error.", ["model", "tenant"]
)
MODEL_SECONDS = Histogram(
    "adapters_model_request_seconds", "Time from request to last token.", ["model"], buckets=_LATENCY
)
FIDELITY_REQUESTS = Counter(
    "adapters_fidelity_requests_total",
    "Generation requests by the fidelity class of their adapter on this server's precision (base: no adapter).",
    ["fidelity"],
)
# Engine replicas behind Ray Serve: where each request was routed, and whether its adapter was there already.
REPLICA_ROUTES = Counter(
    "adapters_replica_routes",
    "Calls routed to each engine replica, by whether the adapter was loaded there (hit), loaded for it (cold) or "
    "not needed (base).",
    ["replica", "result"],
)
REPLICA_RETRIES = Counter(
    "adapters_replica_retries", "Calls sent again after the replica they went to was lost before it answered."
)

_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class _Engines(Collector):
    """The engines this process serves with, read at each scrape: queue, adapters in memory, loads, passes."""

    def __init__(self) -> None:
        self.engines: list[Engine] = []

    def collect(self) -> Iterator[Metric]:
        statuses = [engine.status() for engine in self.engines]
        running, waiting = sum(s.running for s in statuses), sum(s.waiting for s in statuses)
        yield GaugeMetricFamily(
            "adapters_running_requests", "Generations running or waiting in the engine now.", running + waiting
        )
        yield GaugeMetricFamily("adapters_requests_waiting", "Generations queued, not yet in a batch.", waiting)
        yield GaugeMetricFamily(
            "adapters_loaded_adapters", "Adapters loaded in the engine now.", sum(len(s.loaded) for s in statuses)
        )
        yield CounterMetricFamily(
            "adapters_adapter_loads", "Adapters loaded into the engine.", sum(s.loads for s in statuses)
        )
        yield CounterMetricFamily(
            "adapters_adapter_evictions",
            "Adapters evicted from the engine to make room.",
            sum(s.evictions for s in statuses),
        )
        passes: dict[int, int] = {}
        for status in statuses:
            for rows, count in status.passes.items():
                passes[rows] = passes.get(rows, 0) + count
        # Bucket bounds spelt as a Histogram spells them ("1.0"): dashboards select buckets by these strings.
        buckets = [(floatToGoString(b), sum(c for rows, c in passes.items() if rows <= b)) for b in _BATCH]
        yield HistogramMetricFamily(
            "adapters_batch_size",
            "Rows in each forward pass.",
            buckets=[*buckets, ("+Inf", sum(passes.values()))],
            sum_value=sum(rows * count for rows, count in passes.items()),
        )
        yield from _vllm(self.engines, statuses)
        yield from _per_replica({r: s for status in statuses for r, s in status.replicas.items()})


def _vllm(engines: list[Engine], statuses: list[EngineStatus]) -> Iterator[Metric]:
    """vLLM's names and labels, which LoRA-aware routers (the Gateway API Inference Extension) read as they are."""
    labels = ["model_name"]
    running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the engine's batch.", labels=labels)
    waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting for the batch.", labels=labels)
    usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", labels=labels)
    lora = GaugeMetricFamily(
        "vllm:lora_requests_info",
        "Adapters of running and waiting requests, by every name they were asked for; the value is when it was read.",
        labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
    )
    for engine, status in zip(engines, statuses, strict=True):
        running.add_metric([engine.model_id], status.running)
        waiting.add_metric([engine.model_id], status.waiting)
        if status.kv_cache_usage is not None:
            usage.add_metric([engine.model_id], status.kv_cache_usage)
        names = [",".join(REQUESTED.names(keys)) for keys in (status.running_adapters, status.waiting_adapters)]
        lora.add_metric([*names, str(status.max_loaded)], time.time())
    yield from (running, waiting, usage, lora)


class _Requested:
    """The names clients sent for the adapter versions now in the engine (`alpha`, `alpha#prod`), so a router that
    matches requests to servers by `model` finds them; the engine knows only versions (`alpha@v1.0.0`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: Tally[tuple[str, str]] = Tally()  # (version, name sent) -> generations in flight

    def names(self, keys: tuple[str, ...]) -> list[str]:
        """Each version of KEYS, its bare name, then every other name a generation in flight asked it by."""
        with self._lock:
            sent = sorted(self._names)
        found: dict[str, None] = {}
        for key in keys:
            found.update(dict.fromkeys([key, key.split("@")[0], *(name for k, name in sent if k == key)]))
        return list(found)

    def add(self, key: str, name: str, count: int) -> None:
        with self._lock:
            self._names[key, name] += count
            if self._names[key, name] <= 0:
                del self._names[key, name]


REQUESTED = _Requested()


def requested_as(
    model: str, submit: Callable[[GenerateRequest], AsyncIterator[Chunk]]
) -> Callable[[GenerateRequest], AsyncIterator[Chunk]]:
    """SUBMIT, each generation on an adapter known by MODEL (the name its client sent) while it is in flight."""

    async def generate(request: GenerateRequest) -> AsyncIterator[Chunk]:
        key = request.adapter.key if request.adapter else None
        if key is None:
            async for chunk in submit(request):
                yield chunk
            return
        REQUESTED.add(key, model, 1)
        try:
            async for chunk in submit(request):
                yield chunk
        finally:
            REQUESTED.add(key, model, -1)

    return generate


def _per_replica(replicas: dict[str, EngineStatus]) -> Iterator[Metric]:
    """Each engine replica's queue and loaded adapter versions (label values: replica ids and versions, bounded)."""
    labels = ["replica"]
    running = GaugeMetricFamily("adapters_replica_running_requests", "Generations in a replica batch.", labels=labels)
    waiting = GaugeMetricFamily("adapters_replica_requests_waiting", "Generations queued in a replica.", labels=labels)
    loaded = GaugeMetricFamily(
        "adapters_replica_adapter_loaded", "1 for each adapter version loaded in a replica.", labels=[*labels, "model"]
    )
    for replica, status in sorted(replicas.items()):
        running.add_metric([replica], status.running)
        waiting.add_metric([replica], status.waiting)
        for key in status.loaded:
            loaded.add_metric([replica, key], 1)
    yield from (running, waiting, loaded)


ENGINES = _Engines()
REGISTRY.register(ENGINES)
