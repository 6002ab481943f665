"""Training data: JSONL in chat, prompt/completion or Alpaca format, tokenized with loss on answers only."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterctl.core import tool_calls
from adapterctl.core.errors import DataError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)
FORMAT_KEYS = {
    "chat": "'messages'",
    "prompt_completion": "'prompt' and 'completion'",
    "alpaca": "'instruction' and 'output' (optional 'input')",
}

Message = dict[str, str]


@dataclass(frozen=True)
class Examples:
    """A parsed dataset: every line normalised to a chat conversation."""

    path: Path
    format: str
    sha256: str
    conversations: list[list[Message]]


def detect_format(record: dict[str, Any]) -> str | None:
    """Name the format a JSON record is written in, or None when it matches none."""
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def load(path: Path) -> Examples:
    """Read a JSONL dataset, detect its format from the first line and validate every line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a JSONL dataset with --data.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8.") from None
    fmt, first_line, conversations = None, 0, []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}.")
        line_format = detect_format(record)
        if line_format is None:
            expected = "; or ".join(f"{keys} ({name})" for name, keys in FORMAT_KEYS.items())
            raise DataError(f"{path}:{lineno}: unknown format, found keys {sorted(record)}; expected {expected}.")
        if fmt is None:
            fmt, first_line = line_format, lineno
        elif line_format != fmt:
            raise DataError(
                f"{path}:{lineno}: this line is in {line_format} format but line {first_line} is in {fmt} "
                f"format; one file holds one format."
            )
        try:
            conversations.append(to_messages(fmt, record))
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: {exc}") from None
    if not conversations:
        raise DataError(f"{path} holds no examples.")
    return Examples(path, fmt, hashlib.sha256(raw).hexdigest(), conversations)


def _text(record: dict[str, Any], key: str, required: bool = True) -> str:
    """A string field of a record; empty is allowed only for optional fields."""
    value = record.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}.")
    if required and not value.strip():
        raise ValueError(f"{key!r} is empty.")
    return value


def to_messages(fmt: str, record: dict[str, Any]) -> list[Message]:
    """Normalise one record of the given format to a list of chat messages."""
    if fmt == "prompt_completion":
        return [
            {"role": "user", "content": _text(record, "prompt")},
            {"role": "assistant", "content": _text(record, "completion")},
        ]
    if fmt == "alpaca":
        extra = _text(record, "input", required=False)
        instruction = _text(record, "instruction")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects.")
    if record.get("tools") or any(
        isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages
    ):
        messages = _with_tools(messages, record.get("tools"))
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(message).__name__}.")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; expected one of {', '.join(ROLES)}.")
        try:
            result.append({"role": role, "content": _text(message, "content")})
        except ValueError as exc:
            raise ValueError(f"messages[{i}]: {exc}") from None
    roles = [m["role"] for m in result]
    if "assistant" not in roles:
        raise ValueError("no assistant message: nothing to learn from.")
    if "user" not in roles[: roles.index("assistant")]:
        raise ValueError("the first assistant message must follow a user message.")
    return result


def _with_tools(messages: list[Any], tools: Any) -> list[Message]:
    """OpenAI's fine-tuning format of tools and assistant tool_calls as plain turns, written as the server renders
    them and parses its answers (`core.tool_calls`)."""
    try:
        return tool_calls.plain(messages, tools)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"tools and tool_calls must be OpenAI's ({{'type': 'function', 'function': {{name, arguments}}}}): {exc!r}"
        ) from None


def split(count: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval split of `count` examples by seed; eval gets at least one if asked for."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_eval = round(count * eval_fraction)
    if eval_fraction > 0 and count >= 2:
        n_eval = min(max(n_eval, 1), count - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def tokenize(conversation: list[Message], tokenizer: Any, seq_len: int) -> dict[str, list[int]] | None:
    """Apply the chat template and label only assistant tokens; None when truncation leaves no answer."""
    if not tokenizer.chat_template:
        raise DataError(
            "The base model's tokenizer has no chat template; use an instruct model, or add a "
            "`chat_template` to its tokenizer_config.json."
        )
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    spans = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(conversation[:i], tokenize=False, add_generation_prompt=True)
        answer = tokenizer.apply_chat_template(conversation[: i + 1], tokenize=False)
        if not (full.startswith(prompt) and full.startswith(answer)):
            raise DataError("The base model's chat template renders prefixes inconsistently; cannot mask prompts.")
        spans.append((len(prompt), len(answer)))
    encoded = tokenizer(
        full, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=seq_len
    )
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
