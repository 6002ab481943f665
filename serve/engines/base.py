"""What the HTTP layer needs from an inference engine: token ids and a checked adapter in, chunks out.

Every engine (transformers, vLLM, the tests' fake) implements `Engine`; the layer above translates its errors to
HTTP, records its metrics from what it reports and never reaches inside it.
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from adapterctl.core.precision import Precision
from adapterctl.registry.names import version_ref

MAX_LOGPROBS = 20  # most likely tokens one position may report, as OpenAI allows


@dataclass(frozen=True)
class AdapterSpec:
    """One immutable adapter version resolved and checked by the catalog, its files on local disk."""

    name: str
    version: str  # "v1.2.0"
    path: Path
    commit: str = ""  # the registry commit that registered it: a replica on another machine fetches exactly it

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
    # json_schema as the engine compiled it (`Engine.prepare`): one compile serves all of a request's generations.
    grammar: Any = field(default=None, compare=False, repr=False)

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

    @property
    def adjusted(self) -> bool:
        """Whether logits are changed before a token is picked (penalties, biases or a schema)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.json_schema)


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: REQUEST_ID names it to `abort`, unique among the engine's running ones."""

    request_id: str
    prompt_ids: tuple[int, ...]
    adapter: AdapterSpec | None
    sampling: Sampling
    # Among prompts ready to prefill in one step, lower goes first (then the older): fair share gives the number of
    # its tenant's prompts already waiting in the engine, so one tenant's queue does not hold another's prompt back.
    priority: int = 0
    tenant: str | None = None  # who sent it, under fair share (None: one caller, no fair share)


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability under the served model, and the most likely tokens at its place."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


@dataclass(frozen=True)
class Chunk:
    """What a generation produced since its previous chunk; the last one carries the finish reason."""

    text: str
    token_ids: tuple[int, ...] = ()  # the tokens generated since the previous chunk (usage counts these)
    finish_reason: str | None = None  # "stop" (EOS, a stop string or a stop token) or "length"
    logprobs: tuple[TokenLogprob, ...] = ()  # of token_ids, when asked for
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # first chunk only, when asked (prompt tokens 2..)


@dataclass(frozen=True)
class EngineStatus:
    """What an engine reports of itself at one moment: the layer above records it as metrics."""

    running: int  # generations in the batch
    waiting: int  # generations queued for it
    running_adapters: tuple[str, ...]  # adapter versions of the running ones
    waiting_adapters: tuple[str, ...]
    loaded: tuple[str, ...]  # adapter versions in memory, least recently used first
    max_loaded: int  # adapters it keeps in memory at once
    loads: int = 0  # adapters installed since the engine started
    evictions: int = 0  # adapters dropped to make room since the engine started
    passes: Mapping[int, int] = field(default_factory=dict)  # rows in a forward pass -> passes of that size so far
    replicas: Mapping[str, EngineStatus] = field(default_factory=dict)  # an engine of replicas: each one's own status
    kv_cache_usage: float | None = None  # share of the KV cache's room its requests hold (0 to 1); None: not known

    @classmethod
    def of(cls, running: list[str | None], waiting: list[str | None], **rest: Any) -> EngineStatus:
        """The status of generations whose adapter versions (None: the base) are RUNNING and WAITING."""
        return cls(
            running=len(running),
            waiting=len(waiting),
            running_adapters=tuple(sorted({key for key in running if key})),
            waiting_adapters=tuple(sorted({key for key in waiting if key})),
            **rest,
        )


ABORTED = None  # what an aborted generation's queue receives: its iteration ends without a finish reason
Item = Chunk | BaseException | None  # what a worker hands a generation's queue: a chunk, its error, or ABORTED


async def received(queue: asyncio.Queue[Item]) -> AsyncIterator[Chunk]:
    """The chunks a worker hands to QUEUE, up to the one with a finish reason or ABORTED; an error there is raised."""
    while (item := await queue.get()) is not ABORTED:
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None:
            return


class EngineError(Exception):
    """A request the engine refuses or could not finish; the HTTP layer translates it."""


class InvalidRequest(EngineError):
    """Input no model could run: empty prompt, token ids outside the vocabulary, a schema it cannot compile."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault, when one is


class AdapterLoadFailed(EngineError):
    """An adapter the engine cannot load or apply (the catalog checked it; the runtime still refused it)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key} cannot be served: {reason}")
        self.key = key
        self.reason = reason


class GenerationFailed(EngineError):
    """The engine failed while running this request (the others keep running)."""


class EngineUnavailable(EngineError):
    """The engine cannot take or finish this request now (a replica of it died); the client may send it again."""


class EngineDead(EngineUnavailable):
    """The engine's runtime died (its batch loop, vLLM's engine core): it serves nothing more, so the server exits
    for its supervisor to restart it."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"The engine died ({reason}); the server is shutting down: send the request again.")
        self.reason = reason


class Engine(ABC):
    """A base model serving many adapters; the HTTP layer knows nothing else about the runtime."""

    name: ClassVar[str]  # "transformers", "vllm": what `adapters serve --engine` calls it
    model_id: str  # the base model's id in /v1/models and as a request's `model`
    fingerprint: str  # "sha256:..." of the base weights; the catalog serves adapters that record the same
    precision: Precision  # the base weights as adapters see them (fidelity is judged against it)
    context_length: int  # prompt plus completion tokens one request may hold
    vocab_size: int  # token ids lie in [0, vocab_size)
    prompt_characters: int  # a prompt text longer than this cannot fit the context, whatever its tokens
    max_rank: int  # the largest LoRA rank this engine accepts
    max_loaded: int  # adapters in memory at once
    max_batch: int | None = None  # generations it runs at once (its batch; more wait in its queue); None: unsaid
    max_batched_tokens: int | None = None  # prompt tokens one step prefills at most; None: unsaid

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
    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a chat (and the TOOLS it may call), rendered with the base model's chat template and an open
        assistant turn."""

    @property
    def dead(self) -> str | None:
        """Why this engine can serve nothing more (its runtime died); None while it serves."""
        return None

    def check(self, request: GenerateRequest) -> None:
        """Raise InvalidRequest for input this engine cannot run, before anything is queued or sent (EngineDead once
        it died)."""
        if (dead := self.dead) is not None:
            raise EngineDead(dead)
        ids = request.prompt_ids
        if not ids:
            raise InvalidRequest("The prompt is empty: it must hold at least one token.", param="prompt")
        if len(ids) >= self.context_length:
            raise InvalidRequest(f"The prompt is {len(ids)} tokens; the context holds {self.context_length}.")
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
            raise InvalidRequest(f"The prompt holds token ids outside this model's vocabulary of {self.vocab_size}.")
        sampling = request.sampling
        for name, tokens in (
            ("logit_bias", [t for t, _ in sampling.logit_bias]),
            ("stop_token_ids", sampling.stop_token_ids),
        ):
            if not all(0 <= t < self.vocab_size for t in tokens):
                raise InvalidRequest(
                    f"{name} names token ids outside this model's vocabulary of {self.vocab_size}.", param=name
                )

    async def prepare(self, samplings: list[Sampling]) -> list[Sampling]:
        """SAMPLINGS (one request's) ready to run: a JSON schema checked and compiled once for all of them, off the
        event loop; InvalidRequest naming response_format for one the engine cannot follow."""
        return samplings

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """REQUEST's chunks as its batches run (an async generator); `check`s it first.

        Leaving the iteration early, or `abort`, frees its row. A failure of this request alone raises an
        EngineError from the iteration; other requests keep running. When the runtime dies, every running and
        queued generation raises EngineDead, and so does every later call, `dead` saying why.
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running or queued generation now; its iteration ends without a finish reason. Unknown ids: no-op."""

    @abstractmethod
    async def load(self, adapter: AdapterSpec) -> bool:
        """Make ADAPTER ready; True when it was loaded now, False when already loaded. AdapterLoadFailed if it can't."""

    @abstractmethod
    async def unload(self, key: str) -> bool:
        """Drop a loaded adapter; False when it is not loaded or a generation is using it."""

    async def loaded(self) -> list[str]:
        """Keys of the loaded adapters, least recently used first."""
        return list(self.status().loaded)

    @abstractmethod
    def status(self) -> EngineStatus:
        """Its queue, adapters and counters now (cheap: read at every metrics scrape)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the engine; call after draining."""
