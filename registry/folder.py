"""Checks an adapter folder before it is registered: PEFT files, safetensors only, a base fingerprint."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterctl.core.base import FINGERPRINT
from adapterctl.core.errors import RegistryError
from adapterctl.core.precision import Precision

# Formats that unpickle (and so can run code) when loaded; a registry never accepts them.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}
# Float dtypes of safetensors: (unsigned view, exponent mask); a value is inf or NaN when its exponent is all ones.
_FLOATS = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000), "F64": ("<u8", 0x7FF << 52)}
# PEFT saves "base_model.model.<module path>.lora_A.weight" (the adapter name is dropped on save).
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_BIG_FILE = 64 << 20  # bytes: below this a sparse file costs nothing to read
NOT_PLAIN = "is not a plain file; an adapter folder holds files only."
# The files of an adapter folder, named here once.
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
LINEAGE = "lineage.json"
CARD = "README.md"
# LoRA options the engines cannot apply: PEFT's DoRA, trained biases, layer replication, whole modules and tokens.
UNSERVABLE = ("use_dora", "modules_to_save", "layer_replication", "lora_bias", "trainable_token_indices")


class InvalidAdapter(RegistryError):
    """A folder is not a registrable adapter."""

    exit_code = 2


class Unservable(InvalidAdapter):
    """An adapter uses LoRA options no engine of the server applies."""


def check(folder: Path, shown: Path | None = None, scan: bool = True, allow_unservable: bool = False) -> dict[str, Any]:
    """Validate FOLDER and return the summary recorded with the version; messages name it SHOWN (the user's folder
    when FOLDER is the copy taken of it). Without SCAN the weights' values are not read: headers and files only.
    ALLOW_UNSERVABLE keeps an adapter whose options the server cannot apply (the summary says which)."""
    try:
        return _checked(folder, scan, allow_unservable)
    except InvalidAdapter as exc:
        if shown is None:
            raise
        raise InvalidAdapter(str(exc).replace(str(folder), str(shown))) from None


def _checked(folder: Path, scan: bool, allow_unservable: bool) -> dict[str, Any]:
    if not folder.is_dir():
        raise InvalidAdapter(f"{folder} is not a folder; pass the folder `adapters train` wrote.")
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file():
            raise InvalidAdapter(f"{path} {NOT_PLAIN}")
        if path.suffix in PICKLE_SUFFIXES:
            raise InvalidAdapter(f"{path.name}: pickle-based weights are refused; save with safetensors.")
    config = read_json(folder / CONFIG)
    if "r" not in config or not isinstance(config.get("base_model_name_or_path"), str):
        raise InvalidAdapter(f"{folder / CONFIG} lacks 'r' or 'base_model_name_or_path'.")
    settings = lora_settings(config, str(folder / CONFIG))
    options = unservable(config)
    if options and not allow_unservable:
        raise Unservable(
            f"{folder / CONFIG}: LoRA options {', '.join(options)} cannot be applied by the server's engines"
        )
    _check_weights(folder / WEIGHTS, settings, scan)
    if not (folder / LINEAGE).exists():
        raise InvalidAdapter(
            f"{folder} has no {LINEAGE}: it was trained elsewhere; name the base it was trained on with --base."
        )
    lineage = read_json(folder / LINEAGE)
    base = lineage.get("base_model") or {}
    if not FINGERPRINT.fullmatch(str(base.get("fingerprint", ""))):
        raise InvalidAdapter(f"{folder / LINEAGE} has no base_model.fingerprint (sha256:... of the base weights).")
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
        **({"unservable": options} if options else {}),
    }


def unservable(config: dict[str, Any]) -> list[str]:
    """The LoRA options of an adapter_config.json that no engine of the server applies, as `option=value`."""
    found = [f"{option}={config[option]!r}" for option in UNSERVABLE if config.get(option)]
    if config.get("bias", "none") != "none":
        found.append(f"bias={config['bias']!r}")
    return found


def copy_file(path: Path, dest: Path) -> None:
    """Copy the plain file PATH to DEST, never through a link: what is copied is what was named."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidAdapter(f"{path} {NOT_PLAIN}") from None
        raise RegistryError(f"Cannot read {path}: {exc.strerror}; nothing was registered.") from None
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise InvalidAdapter(f"{path} {NOT_PLAIN}")
    with open(handle, "rb") as reader, open(dest, "wb") as writer:
        shutil.copyfileobj(reader, writer, 1 << 20)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from PATH; InvalidAdapter, naming the file, when it is absent or not one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidAdapter(f"{path.parent} has no {path.name}; it is not a finished PEFT adapter.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{path} is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{path} must hold a JSON object.")
    return data


@dataclass(frozen=True)
class LoraSettings:
    """How PEFT scales an adapter's LoRA pairs: a rank and alpha per module (patterns over defaults), rsLoRA."""

    r: int
    alpha: float
    rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def rank(self, module: str) -> int:
        """The rank of MODULE's pair (a module path such as model.layers.0.self_attn.q_proj)."""
        return _matching(self.rank_pattern, module, self.r)

    def scaling(self, module: str) -> float:
        """What PEFT multiplies MODULE's B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        rank, alpha = self.rank(module), _matching(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def _matching(pattern: tuple[tuple[str, Any], ...], module: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first key (in the config's order) matching the end of MODULE's path."""
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rank(value: Any) -> bool:
    return _size(value) and value >= 1


def lora_settings(config: dict[str, Any], where: str) -> LoraSettings:
    """The LoRA settings of an adapter_config.json (WHERE, for messages); InvalidAdapter if no engine can apply them."""
    r, alpha = config.get("r"), config.get("lora_alpha", 8)  # PEFT's default alpha
    if not _rank(r):
        raise InvalidAdapter(f"{where}: 'r' is {r!r}; a LoRA rank is a whole number of at least 1.")
    if not _number(alpha):
        raise InvalidAdapter(f"{where}: 'lora_alpha' is {alpha!r}; it must be a finite number.")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise InvalidAdapter(f"{where}: 'use_rslora' is {rslora!r}; it must be true or false.")
    patterns = []
    for field, valid, what in (
        ("rank_pattern", _rank, "a rank of at least 1"),
        ("alpha_pattern", _number, "a finite number"),
    ):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise InvalidAdapter(f"{where}: '{field}' must map module name patterns to values.")
        for key, value in pattern.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as exc:
                raise InvalidAdapter(f"{where}: '{field}' key {key!r} is not a valid pattern ({exc}).") from None
            if not valid(value):
                raise InvalidAdapter(f"{where}: '{field}' gives {key!r} the value {value!r}; it must be {what}.")
        patterns.append(tuple(pattern.items()))
    return LoraSettings(r, float(alpha), rslora, *patterns)


def _check_weights(path: Path, settings: LoraSettings, scan: bool) -> None:
    """Check the weights as any engine will use them: float tensors, finite values, LoRA pairs of the stated ranks."""
    tensors, start = safetensors_header(path)
    pairs: dict[str, dict[str, list[int]]] = {}
    # Everything the header alone can tell comes first: a file that lies about its size is refused unread.
    for name, tensor in tensors.items():
        dtype = tensor.get("dtype")
        if dtype not in _FLOATS:
            raise InvalidAdapter(f"{path.name}: tensor {name} is {dtype}; LoRA weights must be F16, BF16, F32 or F64.")
        shape, (begin, end) = tensor.get("shape"), tensor["data_offsets"]
        width = int(_FLOATS[dtype][0][2:])  # "<u4": 4 bytes an element
        if not isinstance(shape, list) or not all(map(_size, shape)) or math.prod(shape) * width != end - begin:
            raise InvalidAdapter(
                f"{path.name}: tensor {name} declares shape {shape}, which its {end - begin} bytes do not hold."
            )
        match = LORA_KEY.match(name)
        if match:
            pairs.setdefault(match["module"], {})[match["part"]] = shape
    for module, half in pairs.items():
        rank = settings.rank(module)
        a, b = half.get("A"), half.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise InvalidAdapter(
                f"{path.name}: the LoRA pair of {module} (A {a}, B {b}) is not of rank {rank}, as the config says."
            )
    _refuse_sparse(path)
    if not scan:
        return
    with open(path, "rb") as handle:
        for name, tensor in tensors.items():
            begin, end = tensor["data_offsets"]
            if not _finite(handle, start + begin, end - begin, tensor["dtype"]):
                raise InvalidAdapter(f"{path.name}: tensor {name} holds NaN or infinite values; the adapter is broken.")


def _refuse_sparse(path: Path) -> None:
    """Refuse a large file that holds far fewer bytes on disk than it declares: its holes would be read for hours."""
    info = path.stat()
    stored = info.st_blocks * 512
    if info.st_size > _BIG_FILE and stored < info.st_size // 2:
        raise InvalidAdapter(
            f"{path.name} declares {info.st_size} bytes but only {stored} are stored (a sparse file); "
            "write the adapter out whole."
        )


def _finite(handle: Any, offset: int, size: int, dtype: str) -> bool:
    """Whether the SIZE bytes at OFFSET, floats of DTYPE, hold no inf or NaN (read in slices: memory stays flat)."""
    import numpy as np  # here: registry commands that never check weights stay quick to start

    view, mask = _FLOATS[dtype]
    width = np.dtype(view).itemsize
    if size % width:
        return False
    handle.seek(offset)
    for done in range(0, size, 1 << 24):
        raw = np.frombuffer(handle.read(min(1 << 24, size - done)), dtype=view)
        if np.any((raw & np.array(mask, dtype=view)) == mask):
            return False
    return True


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse the safetensors header and check every tensor lies inside the file; the tensors and where data starts."""
    if not path.is_file():
        raise InvalidAdapter(f"{path.parent} has no {path.name}; adapters are registered as safetensors only.")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        header = handle.read(length) if 0 < length <= min(size - 8, 100 << 20) else b""
    try:
        tensors = {key: t for key, t in json.loads(header).items() if key != "__metadata__"}
        spans = [(int(t["data_offsets"][0]), int(t["data_offsets"][1])) for t in tensors.values()]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise InvalidAdapter(f"{path} is not a valid safetensors file.") from None
    if not spans or max(end for _, end in spans) != size - 8 - length or any(not 0 <= a <= b for a, b in spans):
        raise InvalidAdapter(f"{path} is truncated or holds no tensors.")
    return tensors, 8 + length
