"""The text of tool calls in a chat, one format for all: what `adapters train` teaches and `adapters serve` parses.

Hermes' format (Qwen's and SmolLM3's templates write it too): the tools listed in the system message inside <tools>,
each call a JSON object {"name", "arguments"} inside <tool_call> tags, each result inside <tool_response> tags. A
chat template with its own tools format renders tools and calls itself; one without gets them through `plain`.
"""

from __future__ import annotations

import json
import re
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)

_PREAMBLE = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML \
tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def tools_text(tools: list[dict[str, Any]]) -> str:
    """The system message's part that lists TOOLS (OpenAI's {"type": "function", "function": {...}} objects)."""
    return _PREAMBLE.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))


def call_text(name: str, arguments: dict[str, Any] | str) -> str:
    """One call as the model writes it; ARGUMENTS as an object or OpenAI's JSON text of one."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def plain(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """MESSAGES (OpenAI's: assistant tool_calls, tool results) as system/user/assistant text for a template that has
    no tools format: the tools join the system message, calls the assistant's text, results a user turn."""
    out: list[dict[str, str]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
            content = "\n".join([content, *calls] if content else calls)
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tools_text(tools)}"}
        else:
            out.insert(0, {"role": "system", "content": tools_text(tools)})
    return out


def parse(text: str) -> tuple[str, list[tuple[str, str]]]:
    """TEXT's content and each well-formed call as (name, arguments as JSON text). The content is the text before the
    first call; what follows the calls (a model that missed its end) is dropped, as vLLM does."""
    calls: list[tuple[str, str]] = []
    start = len(text)
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match[1])
        except ValueError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            start = min(start, match.start())
            calls.append((call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False)))
    return text[:start].strip(), calls
