"""On the real embedded SmolLM2-135M-Instruct: a short QLoRA run visibly changes held-out answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES
from train import compare
from core.base import resolve_base
from train.config import TrainArgs
from train.trainer import train

KEYS = ["name", "age", "city", "job"]
HELDOUT = (EXAMPLES / "pirate_heldout.txt").read_text().splitlines()
_PIRATE = re.compile(r"\b(arr+|matey|ahoy|yo ho|me hearty|scallywag)\b", re.IGNORECASE)


def in_pirate_voice(text: str) -> bool:
    """Whether an answer carries the pirate style the example dataset teaches (the base model never talks so)."""
    return bool(_PIRATE.search(text))


def _is_contact_json(text: str) -> bool:
    """One line of JSON with exactly the contact keys, in order."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return "\n" not in text and isinstance(value, dict) and list(value) == KEYS


@pytest.mark.slow
def test_qlora_on_the_embedded_model_teaches_one_line_json(tmp_path: Path, embedded_base: Path) -> None:
    args = TrainArgs(
        name="contacts",
        data=EXAMPLES / "contacts.jsonl",
        qlora=True,
        max_steps=30,
        lr=1e-3,
        batch_size=8,
        seq_len=128,
        output=tmp_path / "contacts",
    )
    result = train(args, echo=print)
    assert result.eval_loss_after < result.eval_loss_before

    heldout = [json.loads(line) for line in (EXAMPLES / "contacts_heldout.jsonl").read_text().splitlines()]
    model, tokenizer = compare.load(resolve_base(None), tmp_path / "contacts")
    answers = compare.side_by_side(model, tokenizer, [r["prompt"] for r in heldout], max_new_tokens=40)
    base_rate = sum(_is_contact_json(b) for b, _ in answers) / len(answers)
    adapter_rate = sum(_is_contact_json(a) for _, a in answers) / len(answers)
    exact = sum(a == r["completion"] for (_, a), r in zip(answers, heldout)) / len(answers)
    print(f"valid contact JSON: base {base_rate:.0%}, adapter {adapter_rate:.0%}; exact matches {exact:.0%}")
    assert adapter_rate >= 0.8 and adapter_rate - base_rate >= 0.5
