"""How a base model's weights are held while it computes: as saved, or quantized by bitsandbytes."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

# bitsandbytes' CPU backend says on import that an optional kernel, fetched from a model hub by the `kernels`
# package, is missing (nothing is fetched at run time here; its built-in kernel is used), and its 8-bit matmul
# says on every call that float32 inputs are cast to float16, as it is designed to: neither is news to a user.
for _noisy in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

# The settings `--quantize` names; training with --qlora uses "nf4", plain LoRA uses "none".
QUANTIZE = ("nf4", "int8", "none")
UNKNOWN = "unknown"
NF4_BLOCK_SIZE = 64  # bitsandbytes' 4-bit block size, which transformers' BitsAndBytesConfig leaves at its default


@dataclass(frozen=True)
class Precision:
    """The exact form of the base weights an adapter was trained against, or a server runs: part of its identity."""

    quantize: str
    """One of QUANTIZE, or "unknown" for adapters whose lineage predates this record."""
    method: str | None = None
    """The quantization library ("bitsandbytes"), None for weights as saved."""
    quant_type: str | None = None
    """"nf4" (4-bit NormalFloat) or "int8" (LLM.int8)."""
    double_quant: bool | None = None
    """Whether the 4-bit block scales are quantized too."""
    block_size: int | None = None
    """Weights per 4-bit quantization block."""
    compute_dtype: str | None = None
    """The dtype the layers compute in (and hold unquantized weights in)."""

    @classmethod
    def of(cls, quantize: str, compute_dtype: str) -> Precision:
        """The settings `quantization_config(quantize, ...)` loads a base with, computing in COMPUTE_DTYPE."""
        if quantize == "nf4":
            return cls("nf4", "bitsandbytes", "nf4", True, NF4_BLOCK_SIZE, compute_dtype)
        if quantize == "int8":
            return cls("int8", "bitsandbytes", "int8", None, None, compute_dtype)
        if quantize == "none":
            return cls("none", compute_dtype=compute_dtype)
        raise ValueError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZE)}")

    @classmethod
    def from_lineage(cls, record: Any) -> Precision:
        """The precision a lineage record (or registry summary) holds; "unknown" when absent or malformed."""
        if not isinstance(record, dict) or record.get("quantize") not in QUANTIZE:
            return cls(UNKNOWN)
        fields = {k: record.get(k) for k in cls.__dataclass_fields__}
        try:
            return cls(**fields)
        except TypeError:
            return cls(UNKNOWN)

    def to_lineage(self) -> dict[str, Any]:
        """The record written to lineage.json and the registry summary."""
        return asdict(self)

    @property
    def known(self) -> bool:
        """Whether the record says what the weights were."""
        return self.quantize != UNKNOWN

    def same_weights(self, other: Precision) -> bool:
        """Whether both hold the base weights identically (compute dtype aside: it rounds activations, not weights)."""
        keys = ("quantize", "method", "quant_type", "double_quant", "block_size")
        return self.known and other.known and all(getattr(self, k) == getattr(other, k) for k in keys)

    def describe(self) -> str:
        """One phrase for messages: 'nf4 (bitsandbytes, double quantization, block 64, compute float32)'."""
        if not self.known:
            return "unknown"
        if self.quantize == "none":
            return f"none (weights as saved, {self.compute_dtype})"
        parts = [self.method or "?"]
        if self.double_quant:
            parts.append("double quantization")
        if self.block_size:
            parts.append(f"block {self.block_size}")
        parts.append(f"compute {self.compute_dtype}")
        return f"{self.quantize} ({', '.join(parts)})"


def quantization_config(quantize: str, compute_dtype: Any) -> Any:
    """bitsandbytes settings for QUANTIZE ("nf4": 4-bit NF4 with double quantization, "int8"), or None."""
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZE)}")


def default_quantize() -> str:
    """`adapters serve`'s default: nf4 where bitsandbytes imports (it runs on CPU too), else the weights as saved."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken native library raises anything from OSError to RuntimeError
        return "none"
    return "nf4"
