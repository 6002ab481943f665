"""How much of an adapter's effect survives on each precision a server runs: eval loss, base vs adapter."""

from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapterctl.core.base import BaseModel, fingerprint, resolve_base
from adapterctl.core.errors import BaseModelError, DataError
from adapterctl.core.precision import QUANTIZE, Precision
from adapterctl.registry.folder import LINEAGE
from adapterctl.registry.names import Ref
from adapterctl.registry.repo import Registry
from adapterctl.train import compare, data


@torch.inference_mode()
def losses(model: Any, examples: list[dict[str, list[int]]], batch_size: int = 8) -> tuple[float, float]:
    """Token-averaged loss on EXAMPLES' labelled tokens of the base (adapter off) and of the adapter."""

    def loss() -> float:
        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            width = max(len(e["input_ids"]) for e in chunk)
            # Right padding: positions of real tokens stay as they were in training.
            ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in chunk])
            mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in chunk])
            labels = torch.tensor([e["labels"] + [data.IGNORE_INDEX] * (width - len(e["labels"])) for e in chunk])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=data.IGNORE_INDEX,
                reduction="sum",
            ).item()
            count += int((targets != data.IGNORE_INDEX).sum())
        return total / max(count, 1)

    with model.disable_adapter():
        base = loss()
    return base, loss()


def measure_one(base: BaseModel, adapter: Path, quantize: str, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Eval losses of base and adapter on QUANTIZE's form of the base weights."""
    model, _ = compare.load(base, adapter, quantize)
    try:
        base_loss, adapter_loss = losses(model, examples)
    finally:
        del model
        gc.collect()
    return {"base_loss": round(base_loss, 5), "adapter_loss": round(adapter_loss, 5)}


def measure(base: BaseModel, adapter: Path, trained: Precision, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
    """The fidelity record: per precision, the share of the improvement measured on the trained precision."""
    found: dict[str, dict[str, Any]] = {}
    for quantize in QUANTIZE:
        try:
            found[quantize] = measure_one(base, adapter, quantize, examples)
        except BaseModelError as exc:  # e.g. int8 where bitsandbytes lacks a kernel: say so, measure the rest
            found[quantize] = {"error": str(exc)}
    reference = found.get(trained.quantize, {})
    gain = reference.get("base_loss", 0.0) - reference.get("adapter_loss", 0.0) if "base_loss" in reference else None
    for figures in found.values():
        if "base_loss" in figures:
            figures["fidelity"] = round((figures["base_loss"] - figures["adapter_loss"]) / gain, 3) if gain else None
    return {
        "method": "eval loss, base vs adapter, as a share of the improvement on the trained precision",
        "eval_examples": len(examples),
        "reference": trained.quantize,
        "reference_improvement": None if gain is None else round(gain, 5),
        "precisions": found,
    }


def summary(record: dict[str, Any]) -> str:
    """One line: the share of the adapter's effect kept on each precision."""
    parts = []
    for quantize, figures in record["precisions"].items():
        share = figures.get("fidelity")
        parts.append(f"{quantize} {'n/a' if share is None else f'{share:.0%}'}")
    return f"Fidelity (effect kept, vs {record['reference']} where it was trained): {', '.join(parts)}"


def _dataset(lineage: dict[str, Any], given: Path | None, places: list[Path]) -> tuple[data.Examples, bool]:
    """The examples to score and whether they are the adapter's own eval split (its training file, unchanged)."""
    recorded = lineage.get("dataset") or {}
    if given is None:
        name = recorded.get("file")
        found = [place / name for place in places if name and (place / name).is_file()]
        if not found:
            raise DataError(
                f"The training data of this adapter ({name or 'not recorded'}) is not in "
                f"{' or '.join(str(p) for p in places)}; pass a JSONL dataset with --data."
            )
        given = found[0]
    examples = data.load(given)
    return examples, examples.sha256 == recorded.get("sha256")


def evaluate(
    registry: Registry,
    ref: str,
    quantize: str,
    dataset: Path | None = None,
    base_spec: str | None = None,
    limit: int = 32,
    samples: int = 3,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """Eval loss of base vs adapter REF on QUANTIZE's base, and greedy answers side by side."""
    version = registry.state().resolve(Ref.parse(ref))
    with tempfile.TemporaryDirectory(prefix="adapters-eval-") as work:
        folder = Path(work) / "adapter"
        registry.checkout(version, folder)
        lineage = json.loads((folder / LINEAGE).read_text()) if (folder / LINEAGE).is_file() else {}
        base = resolve_base(base_spec)
        trained_on = (lineage.get("base_model") or {}).get("fingerprint")
        if trained_on and trained_on != fingerprint(base.path):
            raise BaseModelError(
                f"{version.ref} was trained on other base weights ({trained_on}) than {base.name}; pass its base "
                "with --base."
            )
        examples, own_split = _dataset(lineage, dataset, [Path.cwd(), registry.root])
        hyper = lineage.get("hyperparameters") or {}
        if own_split:
            _, chosen = data.split(len(examples.conversations), hyper.get("eval_fraction", 0.1), hyper.get("seed", 42))
        else:
            chosen = list(range(len(examples.conversations)))
        model, tokenizer = compare.load(base, folder, quantize)
        conversations = [examples.conversations[i] for i in chosen]
        scored = [t for c in conversations if (t := data.tokenize(c, tokenizer, hyper.get("seq_len", 512)))][:limit]
        if not scored:
            raise DataError(f"{examples.path}: no example to score; pass another --data.")
        base_loss, adapter_loss = losses(model, scored)
        prompts = [next(m["content"] for m in c if m["role"] == "user") for c in conversations[:samples]]
        answers = compare.side_by_side(model, tokenizer, prompts, max_new_tokens) if prompts else []
    recorded = ((lineage.get("fidelity") or {}).get("precisions") or {}).get(quantize) or {}
    return {
        "ref": version.ref,
        "quantize": quantize,
        "trained_precision": Precision.from_lineage(lineage.get("precision")).quantize,
        "dataset": {"file": str(examples.path), "split": "eval" if own_split else "all", "examples": len(scored)},
        "base_loss": round(base_loss, 5),
        "adapter_loss": round(adapter_loss, 5),
        "improvement": round(base_loss - adapter_loss, 5),
        "recorded_fidelity": recorded.get("fidelity"),
        "samples": [{"prompt": p, "base": b, "adapter": a} for p, (b, a) in zip(prompts, answers)],
    }
