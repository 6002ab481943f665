"""What the HTTP layer needs from an inference engine: token ids and a resolved adapter in, text out."""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.names import version_ref


MAX_LOGPROBS = 20  # most likely tokens one position may report, as OpenAI allows


@dataclass(frozen=True)
class AdapterSpec:
    """One immutable adapter version resolved from the registry, its files on local disk."""

    name: str
    version: str  # "v1.2.0"
    path: Path

    @property
    def key(self) -> str:
        """The id a response reports as its model, and the engine's cache key."""
        return version_ref(self.name, self.version)


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling, with OpenAI's meaning: temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks want fixed lengths)
    logprobs: int | None = None  # per generated token: its log-probability and this many most likely ones
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far, as OpenAI's
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far, as OpenAI's
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) added to its logit
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the generation (not part of its text), as vLLM's
    json_schema: str | None = None  # the output must be JSON matching this schema (its text), enforced per token
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (echo)

    def __post_init__(self) -> None:
        """Refuse settings no engine can sample with (the HTTP layer answers these with a 400 before)."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number of at least 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be above 0 and at most 1, not {self.top_p}")
        if self.seed is not None and not -(1 << 63) <= self.seed < 1 << 64:
            raise ValueError(f"seed must fit in 64 bits, not {self.seed}")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must lie between -2 and 2")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must lie between -100 and 100")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}, not {value}")


@dataclass(frozen=True)
class EngineStatus:
    """What an engine reports of its queue at one moment: the layer above records it as metrics."""

    running: int  # generations in the batch
    waiting: int  # generations queued for it
    running_adapters: tuple[str, ...]  # adapter versions of the running ones
    waiting_adapters: tuple[str, ...]
    max_loaded: int  # adapters it keeps in memory at once


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability under the served model, and the most likely tokens at its place."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


@dataclass(frozen=True)
class Chunk:
    """Text produced since the previous chunk; the last one carries the finish reason."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens generated since the previous chunk, when asked for


@dataclass(eq=False)
class Generation:
    """One request inside the engine: iterate its chunks; `cancel` frees its batch row."""

    prompt_ids: list[int]
    adapter: AdapterSpec | None
    sampling: Sampling
    completion_tokens: int = 0
    cancelled: bool = False
    prompt_logprobs: list[TokenLogprob] | None = None  # set before the first chunk, when asked for
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop, repr=False)
    _queue: asyncio.Queue[Chunk | BaseException] = field(default_factory=asyncio.Queue, repr=False)

    @property
    def adjusted(self) -> bool:
        """Whether its logits are changed before a token is picked (penalties or biases)."""
        s = self.sampling
        return bool(s.presence_penalty or s.frequency_penalty or s.logit_bias or s.json_schema)

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt, as `usage` reports them."""
        return len(self.prompt_ids)

    def publish(self, item: Chunk | BaseException) -> None:
        """Hand a chunk (or the error that ended the generation) to the request's event loop; any thread."""
        deliver([(self, item)])

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine drops the row at its next step."""
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


def deliver(items: list[tuple[Generation, Chunk | BaseException]]) -> None:
    """Hand many generations their chunks with one wake-up of each event loop (a batch step's worth at once)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, Chunk | BaseException]]] = {}
    for generation, item in items:
        by_loop.setdefault(generation._loop, []).append((generation, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # that event loop is closed: nobody reads these generations any more
            for generation, _ in batch:
                generation.cancelled = True


def _put_all(batch: list[tuple[Generation, Chunk | BaseException]]) -> None:
    for generation, item in batch:
        generation._queue.put_nowait(item)


class Engine(ABC):
    """A base model serving many adapters; the HTTP layer knows nothing else about the runtime."""

    model_id: str  # the base model's id in /v1/models and as a request's `model`
    fingerprint: str  # "sha256:..." of the base weights; adapters must record the same
    context_length: int  # prompt plus completion tokens one request may hold
    prompt_characters: int  # a prompt text longer than this cannot fit the context, whatever its tokens
    max_rank: int  # the largest LoRA rank this engine accepts

    @abstractmethod
    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a plain completion prompt."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """The text of token ids (special tokens included, as written)."""

    @abstractmethod
    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text, as log-probabilities name tokens."""

    @abstractmethod
    def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's special tokens, chat template, class and context length, as vLLM's /tokenizer_info."""

    @abstractmethod
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, rendered with the base model's chat template and an open assistant turn."""

    @abstractmethod
    async def load(self, adapter: AdapterSpec) -> bool:
        """Make ADAPTER ready (off the event loop); True when it was loaded now, False when already loaded."""

    @abstractmethod
    def unload(self, key: str) -> bool:
        """Drop a loaded adapter; False when it is not loaded or a generation is using it."""

    @abstractmethod
    def loaded(self) -> list[str]:
        """Keys of the loaded adapters, most recently used last."""

    @abstractmethod
    def submit(self, generation: Generation) -> None:
        """Queue GENERATION; its chunks arrive through it as the engine's batches run."""

    @abstractmethod
    def status(self) -> EngineStatus:
        """Its queue now: running and waiting generations and their adapters."""

    @abstractmethod
    def running(self) -> int:
        """Generations queued or running."""

    @abstractmethod
    def close(self) -> None:
        """Stop the engine's worker; call after draining."""
