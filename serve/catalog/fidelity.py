"""Whether an adapter keeps its effect on this server's base weights: judged from what its version records."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from adapterctl.core.precision import Precision
from adapterctl.registry.refs import AdapterVersion
from adapterctl.registry.repo import Registry
from adapterctl.serve.errors import AdapterRejected
from adapterctl.serve.api.metrics import FIDELITY_REQUESTS

log = logging.getLogger("serve")

# Below this share of its trained effect (eval-loss fidelity) most of an adapter's greedy answers are the base
# model's again. Calibrated on the embedded model (bench/fidelity.py --sweep, the pirate adapter weakened on its own
# precision, 12 held-out prompts): LoRA 10/12 in style at 81%, 3/12 at 69%; QLoRA 6/12 at 82%, 3/12 at 71%.
LOW = 0.8
# Classes, from best to worst: trained on these very weights; other weights but measured to keep its effect;
# measured to lose it; other weights, never measured; nothing recorded about its precision.
MATCH, KEPT, LOW_CLASS, UNMEASURED, UNKNOWN = "match", "kept", "low", "unmeasured", "unknown"
REFUSED_WHEN_STRICT = (LOW_CLASS, UNMEASURED, UNKNOWN)


@dataclass(frozen=True)
class Verdict:
    """How one adapter version fares on this server's precision."""

    key: str
    fidelity_class: str
    adapter_precision: Precision
    server_precision: Precision
    fidelity: float | None  # the share of its effect measured on the server's precision, when recorded

    def to_dict(self) -> dict[str, Any]:
        """What /v1/models and /admin/loaded show."""
        return {
            "class": self.fidelity_class,
            "trained_precision": self.adapter_precision.quantize,
            "server_precision": self.server_precision.quantize,
            "measured_fidelity": self.fidelity,
        }

    def message(self) -> str:
        """Both precisions, the measured figure and what to do."""
        trained, server = self.adapter_precision.quantize, self.server_precision.quantize
        measured = "not measured" if self.fidelity is None else f"measured fidelity {self.fidelity:.0%}"
        retrain = {"nf4": "`adapters train` (QLoRA, the default)", "none": "`adapters train --no-qlora`"}.get(server)
        again = f", or retrain it with {retrain} to match this server" if retrain else ""
        if not self.adapter_precision.known:
            return (
                f"{self.key} does not record the base precision it was trained against, so how much of its effect "
                f"survives on this server's {server} base is unknown; check it with `adapters eval {self.key} "
                f"--quantize {server}`{again}."
            )
        return (
            f"{self.key} was trained against a {trained} base and this server runs {server} ({measured} on "
            f"{server}); serve it with `adapters serve --quantize {trained}`{again}."
        )


class Fidelity:
    """Judges adapters against the server's precision, remembers each verdict, and refuses poor ones when strict."""

    def __init__(self, server: Precision, strict: bool = False, low: float = LOW) -> None:
        self.server = server
        self.strict = strict
        self.low = low
        self._verdicts: dict[str, Verdict] = {}
        self._summaries: dict[tuple[str, str], dict[str, Any]] = {}  # (ref, commit) -> registry summary: immutable
        self._lock = threading.Lock()

    def judge(self, key: str, summary: dict[str, Any]) -> Verdict:
        """The verdict on KEY from its registry summary (precision and fidelity as `registry.folder.check` gives)."""
        trained = Precision.from_lineage(summary.get("precision"))
        figures = ((summary.get("fidelity") or {}).get("precisions") or {}).get(self.server.quantize) or {}
        share = figures.get("fidelity") if isinstance(figures.get("fidelity"), int | float) else None
        if not trained.known:
            kind = UNKNOWN
        elif share is not None and share < self.low:
            kind = LOW_CLASS
        elif trained.same_weights(self.server):
            kind = MATCH
        else:
            kind = UNMEASURED if share is None else KEPT
        return Verdict(key, kind, trained, self.server, share)

    def admit(self, key: str, summary: dict[str, Any]) -> Verdict:
        """Judge an adapter being loaded: log a poor fit with both figures; refuse it (422) when strict."""
        verdict = self.judge(key, summary)
        with self._lock:
            first = key not in self._verdicts
            self._verdicts[key] = verdict
        if verdict.fidelity_class in REFUSED_WHEN_STRICT and self.strict:
            raise AdapterRejected(f"{verdict.message()} (This server runs with --strict-fidelity.)")
        if verdict.fidelity_class != MATCH and first:
            log.warning("Serving %s (fidelity class %s): %s", key, verdict.fidelity_class, verdict.message())
        return verdict

    def verdict(self, key: str) -> Verdict | None:
        """The verdict given when KEY was loaded, if it was."""
        return self._verdicts.get(key)

    def count(self, key: str | None) -> None:
        """Count one served request by the fidelity class of its adapter ("base" for the base model)."""
        verdict = self._verdicts.get(key) if key else None
        FIDELITY_REQUESTS.labels(
            fidelity="base" if key is None else verdict.fidelity_class if verdict else UNKNOWN
        ).inc()

    def describe(self, registry: Registry, versions: list[AdapterVersion]) -> dict[str, dict[str, Any]]:
        """The verdict on each version (by ref), from the summary its registry entry records (read once)."""
        missing = [v for v in versions if (v.ref, v.commit) not in self._summaries]
        for version, meta in zip(missing, registry.metas(missing) if missing else [], strict=True):
            self._summaries[(version.ref, version.commit)] = meta
        return {v.ref: self.judge(v.ref, self._summaries[(v.ref, v.commit)]).to_dict() for v in versions}
