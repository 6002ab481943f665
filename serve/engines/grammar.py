"""Structured output: a JSON schema compiled by llguidance into a mask over each row's next token.

A schema is compiled once per request, in a thread of its own (never on the event loop or the batch loop), within
a size and a time budget, and refused unless llguidance can follow it: its first steps are walked at compile time,
so that a schema it would give up on (a recursive `$ref`, a pattern beyond its lexer's limits) is a 400 naming
response_format, not an answer cut short with `finish_reason: "stop"`.
"""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from adapterctl.serve.engines.base import InvalidRequest, Sampling

# Whitespace as the model likes it would let a small model pad forever; compact JSON ends.
_OPTIONS = {"whitespace_flexible": False}
# A schema's text: a 20,000-value enum (280 KB) compiles in 0.4 s on the embedded model's tokenizer; a 100,000-value
# one (1.5 MB) is past llguidance's own lexer limit after 0.9 s of work, so text that long is refused unread.
MAX_SCHEMA_CHARACTERS = 512 * 1024
COMPILE_SECONDS = 10.0  # a request's compile (waiting for the thread included); past it, a 400
# llguidance's work limits (its defaults, named here): what one compile or one token's mask may cost.
LIMITS = llguidance.LLParserLimits()
# The walk that proves a schema can be followed: this many random paths of this many tokens from the start.
WALKS = 4
WALK_TOKENS = 32


def _refuse(reason: str) -> InvalidRequest:
    return InvalidRequest(f"response_format holds a JSON schema that cannot be used: {reason}", param="response_format")


class Grammars:
    """Compiles JSON schemas for one tokenizer, whose token table is built here (at engine start)."""

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        self._vocab = vocab
        self._eos = tokenizer.eos_token_id
        self.tokens = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        # Two threads: one long compile does not hold every other request's schema behind it.
        self._compiler = ThreadPoolExecutor(2, thread_name_prefix="grammar")

    async def prepare(self, samplings: list[Sampling]) -> list[Sampling]:
        """SAMPLINGS with their JSON schema compiled once for all of them, off the event loop (InvalidRequest naming
        response_format when it cannot be used or takes over COMPILE_SECONDS)."""
        compiled: dict[str, llguidance.LLMatcher] = {}
        for schema in {s.json_schema for s in samplings if s.json_schema is not None and s.grammar is None}:
            job = asyncio.wrap_future(self._compiler.submit(self.compile, schema))
            try:
                compiled[schema] = await asyncio.wait_for(job, COMPILE_SECONDS)
            except TimeoutError:
                raise _refuse(f"compiling it took over {COMPILE_SECONDS:g} s; send a smaller schema.") from None
        return [replace(s, grammar=compiled[s.json_schema]) if s.json_schema in compiled else s for s in samplings]

    def compile(self, schema: str) -> llguidance.LLMatcher:
        """A matcher of SCHEMA at the start of the output, walked to show that llguidance can follow it (any thread)."""
        if len(schema) > MAX_SCHEMA_CHARACTERS:
            raise _refuse(f"it is {len(schema)} characters, over this server's {MAX_SCHEMA_CHARACTERS}.")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_OPTIONS)
            error = llguidance.LLMatcher.validate_grammar(grammar, self.tokens, limits=LIMITS)
        except ValueError as exc:
            error = str(exc)
        if error:
            raise _refuse(error)
        matcher = llguidance.LLMatcher(self.tokens, grammar, log_level=0, limits=LIMITS)
        for seed in range(WALKS):
            if (error := self._walk(matcher.deep_copy(), random.Random(seed))) is not None:
                raise _refuse(f"the output could not follow it ({error}).")
        return matcher

    def _walk(self, matcher: llguidance.LLMatcher, rng: random.Random) -> str | None:
        """Follow MATCHER along random allowed tokens (end-of-sequence last); the error it meets, if any."""
        for _ in range(WALK_TOKENS):
            mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
            if matcher.is_error():
                return _first_line(matcher.get_error())
            allowed = np.flatnonzero(np.unpackbits(mask, bitorder="little")[: self._vocab])
            if matcher.is_stopped() or not len(allowed):
                return None
            choices = [int(t) for t in allowed if t != self._eos] or [int(allowed[0])]
            matcher.consume_token(rng.choice(choices))
            if matcher.is_error():
                return _first_line(matcher.get_error())
            if matcher.is_stopped():
                return None
        return None

    def restrict(self, matcher: llguidance.LLMatcher, logits: torch.Tensor) -> None:
        """Set every logit of a token the grammar does not allow next to -inf, in place (one row)."""
        mask = llguidance.torch.allocate_token_bitmask(1, self._vocab)
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits[None], mask)


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0] if error.strip() else "llguidance gave no reason"
