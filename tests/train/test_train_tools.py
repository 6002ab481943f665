"""`adapters train` learns tool calls from OpenAI's fine-tuning format: tools and assistant tool_calls are rendered
in the one format the server lists tools in and parses answers from (`core.tool_calls`)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import write_jsonl

from adapterctl.core import tool_calls
from adapterctl.train.data import IGNORE_INDEX, load, tokenize

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
CITIES = ["Oslo", "Rome", "Lima", "Kyiv", "Doha", "Bern", "Riga", "Baku"]
STEPS = 200  # enough for the tiny model to learn the call's shape


def _dataset(path: Path, answered: bool = True) -> Path:
    """Calls of get_weather, each ANSWERED with the tool's result and a reply, or the call alone."""
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
                *(
                    [
                        {"role": "tool", "tool_call_id": f"call_{i}", "content": "Sunny"},
                        {"role": "assistant", "content": f"Sunny in {city}."},
                    ]
                    if answered
                    else []
                ),
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
    from adapterctl.train.config import TrainArgs
    from adapterctl.train.trainer import train

    data = _dataset(tmp_path / "calls.jsonl")
    args = TrainArgs(
        name="caller", data=data, base=str(tiny_base), output=tmp_path / "out", lr=5e-3, batch_size=4, seq_len=512,
        eval_fraction=0.25, rank=8, alpha=16, qlora=False, max_steps=2,
    )  # fmt: skip
    train(args, echo=lambda _: None)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_tool_use_adapter_trained_here_calls_the_tool_when_served(tmp_path: Path, tiny_base: Path) -> None:
    """Trained on calls, registered and served: through the openai client with `tools` offered (`auto`), the adapter
    answers with a parsed call where the base answers in text."""
    from serving import registry_with, serving

    from adapterctl.train.config import TrainArgs
    from adapterctl.train.trainer import train

    args = TrainArgs(
        name="caller", data=_dataset(tmp_path / "calls.jsonl", answered=False), base=str(tiny_base),
        output=tmp_path / "out", lr=1e-2, batch_size=4, seq_len=512, eval_fraction=0.25, rank=8, alpha=16,
        qlora=False, max_steps=STEPS,
    )  # fmt: skip
    train(args, echo=lambda _: None)
    registry = registry_with(tmp_path / "registry", {"caller": [tmp_path / "out"]})
    with serving(None, registry, tiny_base) as server:
        asked = [{"role": "user", "content": "Weather in Rome?"}]
        answers = {
            model: server.client.chat.completions.create(
                model=model, messages=asked, tools=TOOLS, temperature=0, max_tokens=40
            )
            for model in ("caller", "tiny-llama")
        }
    trained, base = (answers[model].choices[0] for model in ("caller", "tiny-llama"))
    assert trained.finish_reason == "tool_calls" and trained.message.content in (None, "")
    [call] = trained.message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    assert base.finish_reason != "tool_calls" and not base.message.tool_calls
