"""Answering held-out prompts with the base model and with an adapter, to see what training changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.base import BaseModel


def load(base: BaseModel, adapter: Path) -> tuple[PeftModel, Any]:
    """The base model with the adapter attached (switchable off), and its tokenizer, ready for generation."""
    tokenizer = AutoTokenizer.from_pretrained(base.path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, use_safetensors=True)
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
