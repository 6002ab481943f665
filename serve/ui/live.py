"""The console's live view: per adapter version, what the server's own Prometheus metrics count, and what is loaded."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import Counter, Histogram

from adapterctl.serve.engines.base import Engine
from adapterctl.serve.catalog.fidelity import Fidelity
from adapterctl.serve.api.metrics import MODEL_ERRORS, MODEL_REQUESTS, MODEL_SECONDS, MODEL_TOKENS
from adapterctl.serve.api.tenants import Tenant


def _samples(metric: Counter | Histogram, suffix: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each sample of METRIC whose name ends with SUFFIX, read in-process."""
    return [(s.labels, s.value) for family in metric.collect() for s in family.samples if s.name.endswith(suffix)]


def _name(model: str) -> str:
    """The adapter name of a model label (NAME@vX.Y.Z), or the label itself for the base model."""
    return model.split("@", 1)[0]


def snapshot(engine: Engine, fidelity: Fidelity | None, tenant: Tenant) -> dict[str, Any]:
    """Requests, tokens, errors and mean latency per model, and the versions loaded now; a tenant sees only its own
    requests to its own adapters (and the base), the admin everything."""
    base = engine.model_id

    def visible(labels: dict[str, str]) -> bool:
        model = labels["model"]
        if tenant.admin:
            return True
        mine = labels.get("tenant", tenant.name) == tenant.name
        return mine and (model == base or tenant.may_use(_name(model)))

    rows: defaultdict[str, dict[str, float]] = defaultdict(
        lambda: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0}
    )
    for labels, value in _samples(MODEL_REQUESTS, "_total"):
        if visible(labels):
            rows[labels["model"]]["requests"] += value
    for labels, value in _samples(MODEL_TOKENS, "_total"):
        if visible(labels):
            rows[labels["model"]][f"{labels['kind']}_tokens"] += value
    for labels, value in _samples(MODEL_ERRORS, "_total"):
        if visible(labels):
            rows[labels["model"]]["errors"] += value
    # Latency is recorded per model only, so a tenant sees it for the models it may use.
    sums = {labels["model"]: value for labels, value in _samples(MODEL_SECONDS, "_sum")}
    counts = {labels["model"]: value for labels, value in _samples(MODEL_SECONDS, "_count")}
    for model, row in rows.items():
        row["mean_seconds"] = sums.get(model, 0.0) / counts[model] if counts.get(model) else None
    status = engine.status()
    loaded = [key for key in status.loaded if tenant.admin or tenant.may_use(_name(key))]
    verdicts = {key: fidelity.verdict(key) if fidelity else None for key in loaded}
    return {
        "models": [{"model": model, **row} for model, row in sorted(rows.items())],
        "loaded": [{"model": key, "fidelity": v.fidelity_class if v else None} for key, v in verdicts.items()],
        "running": status.running + status.waiting if tenant.admin else None,
    }
