"""How a base model's weights are held while it computes: as saved, or quantized by bitsandbytes."""

from __future__ import annotations

from typing import Any

# The settings `--quantize` names; training with --qlora uses "nf4", plain LoRA uses "none".
QUANTIZE = ("nf4", "int8", "none")


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
