"""Dataset formats, validation errors with line numbers, the split, and answer-only labels."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import EXAMPLES, write_jsonl
from transformers import AutoTokenizer

from adapterctl.core.errors import DataError
from adapterctl.train import data


@pytest.mark.parametrize(
    ("file", "fmt", "minimum"),
    [
        ("pirate.jsonl", "chat", 200),
        ("contacts.jsonl", "prompt_completion", 200),
        ("alpaca_sample.jsonl", "alpaca", 20),
    ],
)
def test_example_datasets_load_in_their_format(file: str, fmt: str, minimum: int) -> None:
    examples = data.load(EXAMPLES / file)
    assert examples.format == fmt
    assert len(examples.conversations) >= minimum
    for conversation in examples.conversations:
        assert conversation[-1]["role"] == "assistant"


def test_alpaca_input_joins_the_instruction(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Translate to French", "input": "cat", "output": "chat"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        ],
    )
    first, second = data.load(path).conversations
    assert first == [
        {"role": "user", "content": "Translate to French\n\ncat"},
        {"role": "assistant", "content": "chat"},
    ]
    assert second[0]["content"] == "Say hi"


def test_sha256_is_of_the_file_bytes(tmp_path: Path) -> None:
    import hashlib

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    assert data.load(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


GOOD = '{"prompt": "p", "completion": "c"}'


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([GOOD, GOOD, '{"prompt": "p", '], ":3: not valid JSON"),
        ([GOOD, "[1, 2]"], ":2: expected a JSON object, got list"),
        (['{"text": "hello"}'], ":1: unknown format, found keys ['text']"),
        ([GOOD, '{"messages": [{"role": "user", "content": "x"}]}'], ":2: this line is in chat format but line 1"),
        ([GOOD, '{"prompt": "p", "completion": ""}'], ":2: 'completion' is empty"),
        ([GOOD, '{"prompt": 3, "completion": "c"}'], ":2: 'prompt' must be a string, got int"),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], ":1: messages[0] has role 'robot'"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], ":1: no assistant message"),
        (['{"messages": [{"role": "assistant", "content": "x"}]}'], ":1: the first assistant message must follow"),
        (['{"messages": []}'], ":1: 'messages' must be a non-empty list"),
        (['{"instruction": "i", "output": "o", "input": 5}'], ":1: 'input' must be a string"),
        (["", "   "], "holds no examples"),
    ],
)
def test_malformed_lines_name_the_line_and_the_problem(tmp_path: Path, lines: list[str], expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        data.load(path)
    assert expected in str(error.value)
    assert str(path) in str(error.value)


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        data.load(tmp_path / "nope.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        data.load(path)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, evals = data.split(100, 0.1, seed=7)
    assert (train, evals) == data.split(100, 0.1, seed=7)
    assert data.split(100, 0.1, seed=8) != (train, evals)
    assert len(evals) == 10 and not set(train) & set(evals) and sorted(train + evals) == list(range(100))
    assert len(data.split(3, 0.1, seed=0)[1]) == 1  # a tiny set still gets one eval example
    assert data.split(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _labelled_text(tokenizer, encoded: dict) -> str:
    return tokenizer.decode([t for t in encoded["labels"] if t != data.IGNORE_INDEX])


def test_loss_only_on_assistant_tokens(tokenizer) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
    encoded = data.tokenize(conversation, tokenizer, seq_len=512)
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == len(encoded["attention_mask"])
    assert _labelled_text(tokenizer, encoded) == "Paris.<|im_end|>\nMadrid.<|im_end|>\n"
    full = tokenizer.decode(encoded["input_ids"])
    assert full.startswith("<|im_start|>system\nBe brief.") and "Capital of France?" in full


def test_truncation_keeps_what_fits_and_drops_answerless_examples(tokenizer) -> None:
    conversation = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "answer"}]
    assert data.tokenize(conversation, tokenizer, seq_len=20) is None
    encoded = data.tokenize(conversation, tokenizer, seq_len=512)
    assert len(encoded["input_ids"]) < 512 and _labelled_text(tokenizer, encoded) == "answer<|im_end|>\n"
