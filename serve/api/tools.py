"""Tool calling as vLLM offers it: which calls a chat answer must make, the schema that enforces them, and the
answer's text turned into OpenAI's tool_calls."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from adapterctl.core import tool_calls


@dataclass(frozen=True)
class ToolUse:
    """A chat request's function tools and its tool_choice: "auto", "required" or one function's name."""

    tools: tuple[dict[str, Any], ...]  # OpenAI's {"type": "function", "function": {name, description, parameters}}
    choice: str
    parallel: bool = True

    def functions(self) -> dict[str, dict[str, Any]]:
        """Each function's name -> its JSON schema of arguments."""
        return {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools}

    def schema(self) -> dict[str, Any] | None:
        """What the output must match: a named function's arguments, for "required" an array of calls; None: free."""
        functions = self.functions()
        if self.choice == "auto":
            return None
        if self.choice != "required":
            return functions[self.choice]
        call = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, parameters in functions.items()
        ]
        return {"type": "array", "items": {"anyOf": call}, "minItems": 1, **({} if self.parallel else {"maxItems": 1})}

    @property
    def streams(self) -> bool:
        """Whether the answer streams as it comes: a named function's text is its arguments, so each piece is
        theirs; other choices' calls are known only from the whole text."""
        return self.choice not in ("auto", "required")

    def answer(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The content and OpenAI tool_calls of an answer's TEXT: a named function's arguments are the text, as vLLM
        gives them (a prefix of them when max_tokens cut it); "required" calls that do not parse (cut) are content."""
        if self.choice == "auto":
            content, found = tool_calls.parse(text)
            found = found if self.parallel else found[:1]
            return content or None, [_call(name, arguments) for name, arguments in found]
        if self.choice != "required":
            return None, [_call(self.choice, text)]
        try:
            value = json.loads(text)
        except ValueError:
            return text, []
        return None, [_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in value]

    def message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message of TEXT and its finish reason, as vLLM gives them: "tool_calls" once "auto" made a call
        (however it ended) or "required" made its calls, the engine's reason for a named function."""
        content, calls = self.answer(text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        called = calls and (self.choice == "auto" or finish == "stop") and not self.streams
        return message, ("tool_calls" if called else finish)

    def delta(self, text: str, finish: str | None, first: bool) -> tuple[dict[str, Any], str | None]:
        """A streamed chunk's delta: a named function's call opens with its FIRST piece and each piece adds to its
        arguments; other choices send their whole TEXT's content and calls at once."""
        if self.streams:
            call = _call(self.choice, text) if first else {"function": {"arguments": text}}
            return ({"tool_calls": [{"index": 0, **call}]} if text or first else {}), finish
        message, finish = self.message(text, finish)
        calls = [{"index": i, **call} for i, call in enumerate(message.get("tool_calls", []))]
        return {"content": message["content"], **({"tool_calls": calls} if calls else {})}, finish


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
