"""The engine contract's tokenizer methods, answered by the base model's Hugging Face tokenizer."""

from __future__ import annotations

from typing import Any

from adapterctl.core import tool_calls


class HFTokenizer:
    """Mixin for engines holding `tokenizer` (the base folder's HF tokenizer) and `context_length`."""

    tokenizer: Any
    context_length: int

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a plain completion prompt."""
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (special tokens included, as written)."""
        return self.tokenizer.decode(ids)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text, as log-probabilities name tokens."""
        return [self.tokenizer.decode([token]) for token in ids]

    def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's special tokens, chat template, class and context length, as vLLM's /tokenizer_info."""
        tokens = {name: getattr(self.tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return {
            "tokenizer_class": type(self.tokenizer).__name__,
            **tokens,
            "chat_template": self.tokenizer.chat_template,
            "model_max_length": self.context_length,
            "vocab_size": len(self.tokenizer),
        }

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a chat, rendered with the base model's chat template and an open assistant turn; TOOLS and
        calls by the template's own tools format when it has one, else by `core.tool_calls`' generic one."""
        if "tools" in (self.tokenizer.chat_template or ""):
            options = {"tools": tools} if tools else {}
        else:
            messages, options = tool_calls.plain(messages, tools), {}
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _token_characters(self) -> int:
        """The most characters one token spells: a longer prompt text than context x this cannot fit."""
        return max(len(token) for token in self.tokenizer.get_vocab())
