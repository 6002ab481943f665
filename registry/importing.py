"""Adapters trained elsewhere (PEFT, TRL, Axolotl, Unsloth): what an engine needs, and a lineage saying so."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterctl.core.cache import utc
from adapterctl.core.errors import BaseModelError
from adapterctl.registry import folder
from adapterctl.registry.folder import InvalidAdapter

# What a version holds of a folder written by other tools; everything else is training state or tokenizer files.
KEPT = (folder.CONFIG, folder.WEIGHTS, folder.CARD)
# Adapter settings worth recording as the version's hyper-parameters, as PEFT names them.
_SETTINGS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias", "task_type")
# What transformers' Trainer state tells of the run (trainer_state.json, JSON; training_args.bin is a pickle).
_STATE = ("global_step", "epoch", "max_steps", "num_train_epochs", "train_batch_size", "best_metric")


@dataclass(frozen=True)
class Imported:
    """A foreign adapter folder staged for registration: its kept files plus a lineage; what was left out."""

    path: Path
    left_out: list[str]
    provenance: dict[str, Any]

    def notes(self) -> list[str]:
        """One line per file left out, saying why."""
        return [
            f"Left out {name}: "
            + ("a pickle, never loaded." if Path(name).suffix in folder.PICKLE_SUFFIXES else "not needed to serve it.")
            for name in self.left_out
        ]


def foreign(source: Path) -> bool:
    """Whether SOURCE is an adapter folder some other tool wrote: PEFT files without our lineage."""
    return (source / folder.CONFIG).is_file() and not (source / folder.LINEAGE).exists()


@contextmanager
def staged_if_foreign(source: Path, base: str | None, name: str, label: str | None = None) -> Iterator[Imported | None]:
    """SOURCE staged with a lineage when another tool wrote it (or BASE is given); None for a folder of ours.

    LABEL names SOURCE in messages and the lineage (a Hub repository rather than the folder it was downloaded to)."""
    if not foreign(source):
        if base is not None and (source / folder.LINEAGE).exists():
            raise InvalidAdapter(
                f"{source / folder.LINEAGE} already names the base it was trained on; --base is for adapters "
                "trained elsewhere."
            )
        yield None
        return
    with staged(source, base, name, label) as imported:
        yield imported


@contextmanager
def staged(source: Path, base: str | None, name: str, label: str | None = None) -> Iterator[Imported]:
    """SOURCE's adapter files with a lineage naming BASE, in a temporary folder for as long as the block runs."""
    config = folder.read_json(source / folder.CONFIG)
    shown = label or str(source)
    if base is None:
        named = config.get("base_model_name_or_path") or "BASE"
        raise InvalidAdapter(
            f"{shown} has no {folder.LINEAGE}: it was trained elsewhere, so name the base it was trained on with "
            f"--base (here perhaps --base {named}: a cached model name, a local folder or a Hub id)."
        )
    from adapterctl.core.base import fingerprint, resolve_base

    try:
        model = resolve_base(base)
        base_fingerprint = fingerprint(model.path)
    except BaseModelError as exc:
        raise InvalidAdapter(f"--base {base}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="adapters-import-") as tmp:
        dest = Path(tmp) / "adapter"
        dest.mkdir()
        left_out = []
        for path in sorted(source.iterdir()):
            if path.name in KEPT:
                folder.copy_file(path, dest / path.name)
            else:
                left_out.append(path.name)
        provenance = {"source": label or str(source.resolve()), "left_out": left_out}
        record = _lineage(name, source, config, model, base_fingerprint, provenance)
        (dest / folder.LINEAGE).write_text(json.dumps(record, indent=2) + "\n")
        yield Imported(dest, left_out, provenance)


def _lineage(
    name: str, source: Path, config: dict[str, Any], model: Any, base_fingerprint: str, provenance: dict[str, Any]
) -> dict[str, Any]:
    """The lineage of an imported adapter: its base, its settings and what the trainer's own state says."""
    state = _json_or_empty(source / "trainer_state.json")
    history = [e for e in state.get("log_history") or [] if isinstance(e, dict)]

    def last(key: str) -> float | None:
        values = [e[key] for e in history if isinstance(e.get(key), int | float)]
        return values[-1] if values else None

    # The last logged loss, else the run's mean the Trainer logs at its end.
    metrics = {"train_loss": last("loss") or last("train_loss"), "eval_loss_after": last("eval_loss")}
    return {
        "adapter": name,
        "created_at": utc(),
        "method": "imported",
        "imported": provenance,
        "base_model": {"name": model.name, "hub_id": model.hub_id, "fingerprint": base_fingerprint},
        "precision": None,  # the weights it was trained against are not known: "unknown" to the server
        "dataset": None,
        "hyperparameters": {key: config[key] for key in _SETTINGS if key in config},
        "training": {key: state[key] for key in _STATE if key in state},
        "metrics": {key: value for key, value in metrics.items() if value is not None},
    }


def _json_or_empty(path: Path) -> dict[str, Any]:
    """A JSON object from PATH, or {} when it is absent or not one (another tool's file: read, never required)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
