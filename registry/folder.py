"""Checks an adapter folder before it is registered: PEFT files, safetensors only, a base fingerprint."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from core.base import FINGERPRINT
from core.errors import RegistryError
from core.precision import Precision

# Formats that unpickle (and so can run code) when loaded; a registry never accepts them.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}


class InvalidAdapter(RegistryError):
    """A folder is not a registrable adapter."""

    exit_code = 2


def check(folder: Path) -> dict[str, Any]:
    """Validate FOLDER and return the summary recorded with the version (base, rank, metrics, dataset)."""
    if not folder.is_dir():
        raise InvalidAdapter(f"{folder} is not a folder; pass the folder `adapters train` wrote.")
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file():
            raise InvalidAdapter(f"{path} is not a plain file; an adapter folder holds files only.")
        if path.suffix in PICKLE_SUFFIXES:
            raise InvalidAdapter(f"{path.name}: pickle-based weights are refused; save with safetensors.")
    config = _json(folder / "adapter_config.json")
    if not isinstance(config.get("r"), int) or not isinstance(config.get("base_model_name_or_path"), str):
        raise InvalidAdapter(f"{folder / 'adapter_config.json'} lacks 'r' or 'base_model_name_or_path'.")
    _check_safetensors(folder / "adapter_model.safetensors")
    lineage = _json(folder / "lineage.json")
    base = lineage.get("base_model") or {}
    if not FINGERPRINT.fullmatch(str(base.get("fingerprint", ""))):
        raise InvalidAdapter(
            f"{folder / 'lineage.json'} has no base_model.fingerprint (sha256:... of the base weights)."
        )
    return {
        "base_model": base.get("hub_id") or base.get("name") or config["base_model_name_or_path"],
        "base_fingerprint": base["fingerprint"],
        "peft_type": config.get("peft_type"),
        "rank": config["r"],
        "alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "dataset_sha256": (lineage.get("dataset") or {}).get("sha256"),
        "metrics": lineage.get("metrics") or {},
        # What the adapter was trained against and how much of its effect survives elsewhere ("unknown" if unsaid).
        "precision": Precision.from_lineage(lineage.get("precision")).to_lineage(),
        "fidelity": lineage.get("fidelity") if isinstance(lineage.get("fidelity"), dict) else None,
    }


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidAdapter(f"{path.parent} has no {path.name}; it is not a finished PEFT adapter.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{path} is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{path} must hold a JSON object.")
    return data


def _check_safetensors(path: Path) -> None:
    """Parse the safetensors header and check every tensor lies inside the file."""
    if not path.is_file():
        raise InvalidAdapter(f"{path.parent} has no {path.name}; adapters are registered as safetensors only.")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        header = handle.read(length) if 0 < length <= min(size - 8, 100 << 20) else b""
    try:
        tensors = json.loads(header)
        ends = [t["data_offsets"][1] for key, t in tensors.items() if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError):
        raise InvalidAdapter(f"{path} is not a valid safetensors file.") from None
    if not ends or max(ends) != size - 8 - length:
        raise InvalidAdapter(f"{path} is truncated or holds no tensors.")
