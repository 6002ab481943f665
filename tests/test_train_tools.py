"""`adapters train` learns tool calls from OpenAI's fine-tuning format: tools and assistant tool_calls are rendered
in the one format the server lists tools in and parses answers from (`core.tool_calls`)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_jsonl

from core import tool_calls
from train.data import IGNORE_INDEX, load, tokenize

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
CITIES = ["Oslo", "Rome", "Lima", "Kyiv", "Doha", "Bern", "Riga", "Baku"]


def _dataset(path: Path) -> Path:
    records = [
        {
            "messages": [
                {"role": "user", "content": f"Weather in {city}?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": f"call_{i}",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": f"call_{i}", "content": "Sunny"},
                {"role": "assistant", "content": f"Sunny in {city}."},
            ],
            "tools": TOOLS,
        }
        for i, city in enumerate(CITIES)
    ]
    return write_jsonl(path, records)


def test_the_answers_it_learns_are_calls_the_server_parses(tmp_path: Path, tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    examples = load(_dataset(tmp_path / "calls.jsonl"))
    conversation = examples.conversations[0]
    assert tool_calls.tools_text(TOOLS) in conversation[0]["content"]
    encoded = tokenize(conversation, tokenizer, seq_len=1024)
    assert encoded is not None
    learned = tokenizer.decode([t for t in encoded["labels"] if t != IGNORE_INDEX])
    call = tool_calls.call_text("get_weather", {"city": "Oslo"})
    assert learned.startswith(call)  # the first answer is the call, exactly as written
    assert tool_calls.parse(learned.split("<|im_end|>")[0]) == ("", [("get_weather", '{"city": "Oslo"}')])
    prompt = tokenizer.decode([t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label == IGNORE_INDEX])
    assert "<tool_response>\nSunny\n</tool_response>" in prompt


def test_a_short_run_trains_on_tool_calls(tmp_path: Path, tiny_base: Path) -> None:
    from train.config import TrainArgs
    from train.trainer import train

    data = _dataset(tmp_path / "calls.jsonl")
    args = TrainArgs(
        name="caller", data=data, base=str(tiny_base), output=tmp_path / "out", lr=5e-3, batch_size=4, seq_len=512,
        eval_fraction=0.25, rank=8, alpha=16, qlora=False, max_steps=2,
    )  # fmt: skip
    train(args, echo=lambda _: None)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
