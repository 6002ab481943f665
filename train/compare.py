"""Answering held-out prompts with the base model and with an adapter, to see what training changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterctl.core.base import BaseModel
from adapterctl.core.errors import BaseModelError
from adapterctl.core.precision import quantization_config


def load(base: BaseModel, adapter: Path, quantize: str = "none") -> tuple[PeftModel, Any]:
    """The base held as QUANTIZE says (float32 compute, as served) with the adapter attached, and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(base.path, padding_side="left")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base.path,
            dtype=torch.float32,
            use_safetensors=True,
            quantization_config=quantization_config(quantize, torch.float32),
        )
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise BaseModelError(f"Cannot load {base.name} with --quantize {quantize}: {exc}".splitlines()[0]) from None
    return PeftModel.from_pretrained(model, adapter).eval(), tokenizer


@torch.inference_mode()
def answer(model: PeftModel, tokenizer: Any, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers to single-turn chat prompts, generated as one left-padded batch."""
    chats = [[{"role": "user", "content": prompt}] for prompt in prompts]
    batch = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def side_by_side(
    model: PeftModel, tokenizer: Any, prompts: list[str], max_new_tokens: int = 64
) -> list[tuple[str, str]]:
    """(base answer, adapter answer) for each prompt, from one loaded model."""
    with model.disable_adapter():
        base_answers = answer(model, tokenizer, prompts, max_new_tokens)
    return list(zip(base_answers, answer(model, tokenizer, prompts, max_new_tokens)))
