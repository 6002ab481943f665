"""Prometheus metrics of the server (exposed at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("adapters_requests_total", "HTTP requests answered.", ["endpoint", "status"])
TOKENS = Counter("adapters_tokens_total", "Tokens processed.", ["kind"])  # kind: prompt | completion
REQUEST_SECONDS = Histogram(
    "adapters_request_seconds", "Time from request to last byte.", ["endpoint"], buckets=_LATENCY
)
FIRST_TOKEN_SECONDS = Histogram("adapters_time_to_first_token_seconds", "Time to the first token.", buckets=_LATENCY)
ADAPTER_LOADS = Counter("adapters_adapter_loads_total", "Adapters loaded into the engine.")
ADAPTER_LOAD_SECONDS = Histogram("adapters_adapter_load_seconds", "Time to load one adapter.", buckets=_LATENCY)
EVICTIONS = Counter("adapters_adapter_evictions_total", "Adapters evicted from the engine to make room.")
CACHE_HITS = Counter("adapters_adapter_cache_hits_total", "Requests whose adapter was already loaded.")
LOADED = Gauge("adapters_loaded_adapters", "Adapters loaded in the engine now.")
RUNNING = Gauge("adapters_running_requests", "Generations running or waiting in the engine now.")
BATCH_SIZE = Histogram("adapters_batch_size", "Rows in each forward pass.", buckets=(1, 2, 4, 8, 16, 32, 64, 128))

# Per adapter version and tenant: label values are registry versions and tenants-file names, both bounded.
MODEL_REQUESTS = Counter("adapters_model_requests_total", "Generation requests answered.", ["model", "tenant"])
MODEL_TOKENS = Counter("adapters_model_tokens_total", "Tokens processed.", ["model", "tenant", "kind"])
MODEL_SECONDS = Histogram(
    "adapters_model_request_seconds", "Time from request to last token.", ["model"], buckets=_LATENCY
)
WAITING = Gauge("adapters_requests_waiting", "Generations queued in the engine, not yet in a batch.")
# vLLM's names, which LoRA-aware routers (the Gateway API Inference Extension) read as they are.
VLLM_RUNNING = Gauge("vllm:num_requests_running", "Requests in the engine's batch (vLLM's name).")
VLLM_WAITING = Gauge("vllm:num_requests_waiting", "Requests waiting for the batch (vLLM's name).")
VLLM_LORA = Gauge(
    "vllm:lora_requests_info",
    "Adapters of running and waiting requests; the value is when it was read (vLLM's name and labels).",
    ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
)
FIDELITY_REQUESTS = Counter(
    "adapters_fidelity_requests_total",
    "Generation requests by the fidelity class of their adapter on this server's precision (base: no adapter).",
    ["fidelity"],
)
