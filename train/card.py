"""What an adapter says about itself: the lineage record, the Hugging Face model card and the loss curve."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any


from adapterctl.core.base import BaseModel
from adapterctl.core.cache import utc
from adapterctl.core.errors import RegistryError
from adapterctl.core.precision import Precision
from adapterctl.registry.card import METHODS, card_data, peft_snippet, precision_section, render
from adapterctl.registry.folder import CARD, LINEAGE
from adapterctl.registry.git import Git
from adapterctl.train.config import TrainArgs
from adapterctl.train.data import Examples

LOSS_PLOT = "loss.png"
_LIBRARIES = ("adapterctl", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors")


def _versions() -> dict[str, str | None]:
    """Versions of Python and of every library that shapes the weights."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git_state() -> dict[str, Any] | None:
    """The commit of the git repository around the working directory, if any, and whether it is dirty."""
    try:
        git = Git(Path.cwd())
        commit = git.run("rev-parse", "HEAD")
        status = git.run("status", "--porcelain")
    except (OSError, RegistryError):  # no git here, or no repository around the working directory
        return None
    return {"commit": commit.strip(), "dirty": bool(status.strip())}


def lineage(
    args: TrainArgs,
    base: BaseModel,
    base_fingerprint: str,
    examples: Examples,
    metrics: dict[str, Any],
    counts: dict[str, int],
    resumed_from_step: int | None,
    precision: Precision,
    fidelity: dict[str, Any] | None = None,
    world_size: int = 1,
    logs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record that lets anyone tell exactly what went into an adapter."""
    return {
        "adapter": args.name,
        "created_at": utc(),
        "method": "qlora" if args.qlora else "lora",
        "base_model": {"name": base.name, "hub_id": base.hub_id, "fingerprint": base_fingerprint},
        "precision": precision.to_lineage(),
        "fidelity": fidelity,
        "dataset": {
            "file": examples.path.name,
            "sha256": examples.sha256,
            "format": examples.format,
            "examples": len(examples.conversations),
            "train_examples": counts["train"],
            "eval_examples": counts["eval"],
        },
        "hyperparameters": args.hyperparameters(),
        "seed": args.seed,
        "world_size": world_size,
        "logs": logs,
        "metrics": metrics,
        "parameters": {"trainable": counts["trainable"], "total": counts["total"]},
        "resumed_from_step": resumed_from_step,
        "versions": _versions(),
        "git": _git_state(),
    }


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _model_card(record: dict[str, Any]) -> str:
    """A model card whose YAML header carries the Hub metadata (base_model, library_name: peft, metrics)."""
    base, dataset, metrics = record["base_model"], record["dataset"], record["metrics"]
    meta = card_data(
        record["adapter"], record["method"], base["hub_id"] or base["name"], dataset["file"], metrics["eval_loss_after"]
    )
    hyper = record["hyperparameters"]
    base_id = meta.base_model
    body = f"""
# {record["adapter"]}

A {METHODS[record["method"]]} adapter for `{base_id}`, trained on `{dataset["file"]}`
({dataset["format"]} format, {dataset["train_examples"]} train / {dataset["eval_examples"]} eval examples).

| | |
|---|---|
| eval loss before | {_loss(metrics["eval_loss_before"])} |
| eval loss after | {_loss(metrics["eval_loss_after"])} |
| final train loss | {_loss(metrics["train_loss"])} |
| steps | {metrics["steps"]} |
| rank / alpha / dropout | {hyper["rank"]} / {hyper["alpha"]} / {hyper["dropout"]} |
| target modules | {", ".join(hyper["target_modules"])} |
| learning rate | {hyper["lr"]} |
| seed | {record["seed"]} |
| trainable parameters | {record["parameters"]["trainable"]:,} of {record["parameters"]["total"]:,} |

![training loss]({LOSS_PLOT})

{precision_section(record.get("precision"), record.get("fidelity"))}
## Use it

{peft_snippet(base_id, "path/to/this/folder")}

## Lineage

- base model fingerprint: `{base["fingerprint"]}`
- dataset sha256: `{dataset["sha256"]}`
- git commit: `{(record["git"] or {}).get("commit", "n/a")}`
- libraries: {", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)}

The full record is in `{LINEAGE}`.
"""
    return render(meta, body)


def _plot_loss(log_history: list[dict[str, Any]], metrics: dict[str, Any], path: Path) -> None:
    """Training loss per step, with the eval loss before and after as markers."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    during = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]  # with --eval-steps
    evals = [
        (step, value)
        for step, value in (
            (0, metrics["eval_loss_before"]),
            *during,
            (metrics.get("best_step") or metrics["steps"], metrics["eval_loss_after"]),
        )
        if value is not None
    ]
    figure, axes = pyplot.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axes.plot(*zip(*evals), "o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def write(folder: Path, record: dict[str, Any], log_history: list[dict[str, Any]]) -> None:
    """Write lineage.json, README.md and loss.png next to the adapter weights."""
    (folder / LINEAGE).write_text(json.dumps(record, indent=2) + "\n")
    (folder / CARD).write_text(_model_card(record))
    _plot_loss(log_history, record["metrics"], folder / LOSS_PLOT)
