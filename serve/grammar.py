"""Structured output: a JSON schema compiled by llguidance into a mask over each row's next token."""

from __future__ import annotations

import threading
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from serve.engine import InvalidRequest

# Whitespace as the model likes it would let a small model pad forever; compact JSON ends.
_OPTIONS = {"whitespace_flexible": False}


class Grammars:
    """Compiles JSON schemas for one tokenizer; the tokenizer's token table is built once, on first use."""

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        self._hf, self._vocab = tokenizer, vocab
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _tokens(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab)
            return self._tokenizer

    def check(self, schema: str) -> None:
        """Refuse a schema that is not one (a 400 naming response_format), before it reaches the batch."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_OPTIONS)
            error = llguidance.LLMatcher.validate_grammar(grammar)
        except ValueError as exc:
            error = str(exc)
        if error:
            raise InvalidRequest(
                f"response_format holds a JSON schema that cannot be used: {error}", param="response_format"
            )

    def matcher(self, schema: str) -> llguidance.LLMatcher:
        """A fresh matcher of SCHEMA, at the start of the output."""
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_OPTIONS)
        return llguidance.LLMatcher(self._tokens(), grammar, log_level=0)

    def restrict(self, matcher: llguidance.LLMatcher, logits: torch.Tensor) -> None:
        """Set every logit of a token the grammar does not allow next to -inf, in place (one row)."""
        mask = llguidance.torch.allocate_token_bitmask(1, self._vocab)
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits[None], mask)
