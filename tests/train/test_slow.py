"""On the real embedded SmolLM2-135M-Instruct: short QLoRA runs visibly change held-out answers, served too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import EXAMPLES

from bench.pirate import HELDOUT, in_pirate_voice
from adapterctl.train import compare
from adapterctl.core.base import resolve_base
from adapterctl.train.config import TrainArgs
from adapterctl.train.trainer import train

KEYS = ["name", "age", "city", "job"]


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


@pytest.mark.slow
def test_a_style_adapter_trained_and_served_with_the_defaults_keeps_its_style(
    tmp_path: Path, embedded_base: Path
) -> None:
    """README's plain path: `adapters train` with its default precision, `adapters serve` with its own."""
    import httpx
    from serving import registry_with, serving

    from adapterctl.core.precision import default_quantize
    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    # Only the schedule is set (a short run); the precision and everything else are the defaults.
    args = TrainArgs(
        name="pirate", data=EXAMPLES / "pirate.jsonl", max_steps=30, lr=1e-3, batch_size=8, seq_len=256,
        output=tmp_path / "pirate",
    )  # fmt: skip
    train(args, echo=print)
    lineage = json.loads((tmp_path / "pirate" / "lineage.json").read_text())
    registry = registry_with(tmp_path / "registry", {"pirate": [tmp_path / "pirate"]})

    quantize = default_quantize()
    assert lineage["precision"]["quantize"] == quantize == "nf4"  # bitsandbytes runs here: both sides use NF4
    engine = TransformersEngine(embedded_base, model_id="smollm2", quantize=quantize, max_batch=8)
    with serving(engine, registry, embedded_base) as server:  # fidelity judged, as `adapters serve` does
        answers = [
            server.client.chat.completions.create(
                model="pirate", messages=[{"role": "user", "content": q}], max_tokens=40, temperature=0
            )
            .choices[0]
            .message.content
            for q in HELDOUT[:5]
        ]
        models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    print(answers, lineage["fidelity"])
    assert models["pirate"]["fidelity"]["class"] == "match"
    assert sum(in_pirate_voice(a) for a in answers) >= 4
