"""A fake engine for the HTTP tests that are not about the engine: no torch, instant, deterministic.

It keeps the contract as the real engines do (a worker thread batching every request, an LRU of adapters that
never evicts one in use, seeds, stop strings, penalties, log-probabilities, abort), over a byte-level tokenizer
and a "model" that scores the next byte from a hash of the adapter and the last bytes. Only structured output is
out of its reach: a JSON schema is refused as invalid input.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from adapterctl.core.precision import Precision
from adapterctl.serve.engines.base import (
    ABORTED,
    AdapterLoadFailed,
    AdapterSpec,
    Chunk,
    Engine,
    EngineDead,
    EngineStatus,
    GenerateRequest,
    InvalidRequest,
    TokenLogprob,
    received,
)
from adapterctl.serve.engines.transformers.generation import UNREAD

EOS = 256  # byte tokens 0-255, then end-of-sequence
_LIKELY = [ord(c) for c in "abcdefghijklmnopqrstuvwxyz "]  # the bytes the model favours; others score -20


@dataclass(eq=False)
class _Row:
    request: GenerateRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Chunk | BaseException | None] = field(default_factory=asyncio.Queue)
    rng: random.Random = field(default_factory=random.Random)
    generated: list[int] = field(default_factory=list)
    pending: str = ""  # text held back: it may be the start of a stop string
    cancelled: bool = False
    admitted: bool = False
    unread: int = 0  # chunks sent and not yet taken by the request's reader

    def send(self, item: Chunk | BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the request's event loop is gone
            self.cancelled = True


class FakeEngine(Engine):
    """Everything the HTTP layer needs from an engine, without a model."""

    name = "fake"

    def __init__(
        self,
        *,
        model_id: str = "fake",
        fingerprint: str = "sha256:" + "0" * 64,
        max_loaded: int = 2,
        max_batch: int = 8,
        max_rank: int = 64,
        context_length: int = 512,
        step_seconds: float = 0.001,
    ) -> None:
        self.model_id, self.fingerprint = model_id, fingerprint
        self.precision = Precision.of("none", "float32")
        self.context_length, self.vocab_size = context_length, EOS + 1
        self.prompt_characters = context_length  # one byte per token
        self.max_rank, self.max_loaded, self.max_batch = max_rank, max_loaded, max_batch
        self.step_seconds = step_seconds
        self._cond = threading.Condition()
        self._loaded: OrderedDict[str, int] = OrderedDict()  # key -> rank, least recently used first
        self._users: Counter[str] = Counter()
        self._waiting: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._ids: dict[str, _Row] = {}
        self._loads = self._evictions = 0
        self._passes: Counter[int] = Counter()
        self.tokens = 0  # generated since it started, over every row
        self._closed = False
        self._dead: str | None = None  # why its worker ended without being closed
        self._holds = 0  # `paused` calls holding the batch loop at a step boundary
        self._between_steps = False  # the batch loop waits at a step boundary
        self._worker = threading.Thread(target=self._work, name="fake-engine", daemon=True)
        self._worker.start()

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return list(prompt.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i != EOS).decode(errors="replace")

    def token_texts(self, ids: list[int]) -> list[str]:
        return ["" if i == EOS else bytes([i]).decode(errors="replace") for i in ids]

    def tokenizer_info(self) -> dict[str, Any]:
        return {"tokenizer_class": "FakeBytes", "eos_token": "", "model_max_length": self.context_length}

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: ")

    @property
    def dead(self) -> str | None:
        return self._dead

    def check(self, request: GenerateRequest) -> None:
        super().check(request)
        if request.sampling.json_schema is not None:
            raise InvalidRequest("The fake engine has no structured output.", param="response_format")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.check(request)
        row = _Row(request, asyncio.get_running_loop())
        if request.sampling.seed is not None:
            row.rng.seed(request.sampling.seed)
        with self._cond:
            if request.request_id in self._ids:
                raise InvalidRequest(f"Request id {request.request_id!r} is already running.")
            if self._dead is not None:
                raise EngineDead(self._dead)
            self._ids[request.request_id] = row
            self._waiting.append(row)
            self._cond.notify_all()
        try:
            async for chunk in received(row.queue):
                with self._cond:
                    row.unread -= 1
                    self._cond.notify_all()
                yield chunk
        finally:
            with self._cond:
                row.cancelled = True
                self._ids.pop(request.request_id, None)
                self._cond.notify_all()

    async def abort(self, request_id: str) -> None:
        with self._cond:
            row = self._ids.get(request_id)
            if row is not None and not row.cancelled:
                row.cancelled = True
                row.send(ABORTED)
                self._cond.notify_all()

    async def load(self, adapter: AdapterSpec) -> bool:
        if self._dead is not None:
            raise EngineDead(self._dead)
        rank = _rank(adapter, self.max_rank)
        with self._cond:
            if adapter.key in self._loaded:
                self._loaded.move_to_end(adapter.key)
                return False
            self._place(adapter.key, rank)
            return True

    async def unload(self, key: str) -> bool:
        with self._cond:
            if key not in self._loaded or self._users[key]:
                return False
            del self._loaded[key]
            return True

    def status(self) -> EngineStatus:
        with self._cond:
            running, waiting = self._running, self._waiting
            return EngineStatus.of(
                [r.request.adapter.key if r.request.adapter else None for r in running],
                [r.request.adapter.key if r.request.adapter else None for r in waiting],
                loaded=tuple(self._loaded),
                max_loaded=self.max_loaded,
                loads=self._loads,
                evictions=self._evictions,
                passes=dict(self._passes),
            )

    async def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        await asyncio.to_thread(self._worker.join)

    def _place(self, key: str, rank: int) -> bool:
        """Install KEY, evicting the least recently used idle adapter if full; False when every one is busy."""
        if len(self._loaded) >= self.max_loaded:
            idle = next((k for k in self._loaded if not self._users[k]), None)
            if idle is None:
                return False
            del self._loaded[idle]
            self._evictions += 1
        self._loaded[key] = rank
        self._loads += 1
        return True

    def _work(self) -> None:
        """The worker thread: the batch loop; if it fails, the engine is dead and every generation is told."""
        try:
            self._loop()
        except BaseException as exc:
            with self._cond:
                self._dead = f"its worker stopped on {type(exc).__name__}"
                for row in self._ids.values():
                    row.cancelled = True
                    row.send(EngineDead(self._dead))
                self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._between_steps = True
                self._cond.notify_all()  # a `paused` call waits for this boundary
                self._cond.wait_for(lambda: self._closed or (not self._holds and (self._waiting or self._runnable())))
                self._between_steps = False
                if self._closed:
                    return
                self._admit()
                self._running = [row for row in self._running if not self._finish(row)]
                rows = self._runnable()
                if rows:
                    self._passes[len(rows)] += 1
            for row in rows:
                self._step(row)
            with self._cond:
                self._running = [row for row in self._running if not self._finish(row)]
            threading.Event().wait(self.step_seconds)  # rows join between steps, as in a real batch

    @property
    def parked(self) -> int:
        """Running rows that wait for their reader to take chunks before they generate more."""
        with self._cond:
            return sum(row.unread >= UNREAD for row in self._running)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the batch loop at a step boundary while inside (no step runs): for tests and operators' diagnostics."""
        with self._cond:
            self._holds += 1
            self._cond.wait_for(lambda: self._between_steps or self._closed or self._dead is not None)
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def _runnable(self) -> list[_Row]:
        return [row for row in self._running if row.unread < UNREAD or row.cancelled]

    def _finish(self, row: _Row) -> bool:
        """Whether ROW left the batch (finished, failed or aborted), releasing its adapter."""
        if row.cancelled and row.admitted:
            row.admitted = False
            if row.request.adapter is not None:
                self._users[row.request.adapter.key] -= 1
        return row.cancelled

    def _admit(self) -> None:
        for row in list(self._waiting):
            if len(self._running) >= self.max_batch:
                return
            if row.cancelled:
                self._waiting.remove(row)
                continue
            adapter = row.request.adapter
            if adapter is not None and adapter.key not in self._loaded:
                try:
                    rank = _rank(adapter, self.max_rank)
                except AdapterLoadFailed as exc:
                    self._waiting.remove(row)
                    row.cancelled = True
                    row.send(exc)
                    continue
                if not self._place(adapter.key, rank):
                    continue  # every place is busy: it waits for a row to finish
            if adapter is not None:
                self._users[adapter.key] += 1
                self._loaded.move_to_end(adapter.key)
            self._waiting.remove(row)
            row.admitted = True
            self._running.append(row)

    def _step(self, row: _Row) -> None:
        """One token for ROW, sent as a chunk."""
        request, sampling = row.request, row.request.sampling
        key = request.adapter.key if request.adapter else ""
        context = [*request.prompt_ids, *row.generated]
        raw = _logits(key, context)
        logits = list(raw)
        for token in set(row.generated):
            count = row.generated.count(token)
            logits[token] -= sampling.presence_penalty + sampling.frequency_penalty * count
        for token, bias in sampling.logit_bias:
            logits[token] += bias
        if sampling.ignore_eos:
            logits[EOS] = -math.inf
        token = _pick(logits, sampling.temperature, sampling.top_p, row.rng)
        row.generated.append(token)
        scored = () if sampling.logprobs is None else (_scored(raw, token, sampling.logprobs),)
        prompt = None
        if len(row.generated) == 1 and sampling.prompt_logprobs is not None:
            ids = request.prompt_ids
            prompt = tuple(_scored(_logits(key, ids[:i]), ids[i], sampling.prompt_logprobs) for i in range(1, len(ids)))
        finish = None
        if token == EOS or token in sampling.stop_token_ids:
            text, finish = row.pending, "stop"
        else:
            text, finish = _cut(row, self.token_texts([token])[0], sampling.stop)
        if finish is None and (len(row.generated) >= sampling.max_tokens or len(context) + 1 >= self.context_length):
            text, finish = text + row.pending, "length"
        with self._cond:
            row.unread += 1
            self.tokens += 1
        row.send(Chunk(text, (token,), finish, scored, prompt))
        if finish is not None:
            row.cancelled = True


def _rank(adapter: AdapterSpec, max_rank: int) -> int:
    """The adapter's rank from its PEFT config, refusing what a real engine would refuse."""
    try:
        config = json.loads((adapter.path / "adapter_config.json").read_text())
        rank = int(config["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterLoadFailed(adapter.key, f"unreadable adapter_config.json ({exc}).") from None
    if not (adapter.path / "adapter_model.safetensors").is_file():
        raise AdapterLoadFailed(adapter.key, "no adapter_model.safetensors; the server loads safetensors weights only.")
    if not 0 < rank <= max_rank:
        raise AdapterLoadFailed(adapter.key, f"rank {rank} is not within 1..{max_rank}.")
    return rank


def _logits(key: str, context: tuple[int, ...] | list[int]) -> list[float]:
    """The fake model: the next byte's scores from a hash of the adapter and the last three bytes."""
    digest = hashlib.sha256(f"{key}|{list(context[-3:])}".encode()).digest()
    logits = [-20.0] * (EOS + 1)
    for i, token in enumerate(_LIKELY):
        logits[token] = digest[i] / 32
    logits[EOS] = digest[len(_LIKELY)] / 32 - 4
    return logits


def _log_softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    total = math.log(sum(math.exp(x - top) for x in logits if x > -math.inf))
    return [x - top - total for x in logits]


def _scored(logits: list[float], token: int, top: int) -> TokenLogprob:
    logprobs = _log_softmax(logits)
    best = sorted(range(len(logprobs)), key=lambda t: (-logprobs[t], t))[:top]
    return TokenLogprob(token, logprobs[token], tuple((t, logprobs[t]) for t in best))


def _pick(logits: list[float], temperature: float, top_p: float, rng: random.Random) -> int:
    if temperature == 0:
        return max(range(len(logits)), key=lambda t: (logits[t], -t))
    probs = [math.exp(x) for x in _log_softmax([x / temperature for x in logits])]
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    kept, mass = [], 0.0
    for t in order:
        if mass >= top_p:
            break
        kept.append(t)
        mass += probs[t]
    return rng.choices(kept, weights=[probs[t] for t in kept])[0]


def _cut(row: _Row, text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """The text ROW may send now and "stop" when a stop string appeared (it and what follows are dropped)."""
    row.pending += text
    for stop in stops:
        at = row.pending.find(stop)
        if at >= 0:
            sent, row.pending = row.pending[:at], ""
            return sent, "stop"
    hold = max((n for stop in stops for n in range(1, len(stop)) if row.pending.endswith(stop[:n])), default=0)
    sent, row.pending = row.pending[: len(row.pending) - hold], row.pending[len(row.pending) - hold :]
    return sent, None
