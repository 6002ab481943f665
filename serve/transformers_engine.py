"""The transformers engine: one HF base model (optionally NF4/int8), many LoRA adapters, continuous batching."""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.engine import (
    AdapterLoadFailed,
    AdapterSpec,
    Chunk,
    Engine,
    EngineError,
    EngineStatus,
    GenerateRequest,
    GenerationFailed,
    InvalidRequest,
    Sampling,
    TokenLogprob,
)
from serve.grammar import Grammars
from serve.kvcache import RowCache
from serve.lora import AdapterWeights, Rows, install, plan, read_adapter, uninstall, wrap_linears
from serve.textstream import TextStream
from core.base import fingerprint
from core.precision import Precision, quantization_config

log = logging.getLogger("serve")
_ABORTED = None  # what `abort` hands a generation's queue: its iteration ends without a finish reason


@dataclass(eq=False)
class Generation:
    """One request inside the engine: the worker hands its chunks to the request's event loop."""

    request: GenerateRequest
    completion_tokens: int = 0
    cancelled: bool = False  # finished, failed or aborted: the worker drops its row at the next step
    prompt_logprobs: list[TokenLogprob] | None = None  # scored at prefill, sent with the first chunk
    started: bool = False  # its first chunk is sent
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop, repr=False)
    _queue: asyncio.Queue[Chunk | BaseException | None] = field(default_factory=asyncio.Queue, repr=False)

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.request.prompt_ids

    @property
    def adapter(self) -> AdapterSpec | None:
        return self.request.adapter

    @property
    def sampling(self) -> Sampling:
        return self.request.sampling

    def publish(self, item: Chunk | BaseException | None) -> None:
        """Hand a chunk (or the error that ended the generation) to the request's event loop; any thread."""
        deliver([(self, item)])


def deliver(items: list[tuple[Generation, Chunk | BaseException | None]]) -> None:
    """Hand many generations their chunks with one wake-up of each event loop (a batch step's worth at once)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, Chunk | BaseException | None]]] = {}
    for generation, item in items:
        by_loop.setdefault(generation._loop, []).append((generation, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # that event loop is closed: nobody reads these generations any more
            for generation, _ in batch:
                generation.cancelled = True


def _put_all(batch: list[tuple[Generation, Chunk | BaseException | None]]) -> None:
    for generation, item in batch:
        generation._queue.put_nowait(item)


@dataclass(eq=False)
class _Row:
    """A generation holding a batch row: its tokens so far and how to pick the next one."""

    generation: Generation
    stream: TextStream
    generator: torch.Generator
    length: int = 0  # tokens in the cache
    last: int = 0  # the token the next decode step feeds
    counts: dict[int, int] | None = None  # tokens generated so far, kept only when penalties need them
    matcher: Any = None  # the grammar state of a row whose output must match a JSON schema

    @property
    def key(self) -> str | None:
        adapter = self.generation.adapter
        return adapter.key if adapter else None


@dataclass(eq=False)
class _LoadWait:
    """One `load` call waiting for the worker to read its adapter: answered once, whatever happens."""

    done: bool = False
    error: AdapterLoadFailed | None = None


class TransformersEngine(Engine):
    """Runs every request in one batch loop on a worker thread; rows join and leave the batch at any step."""

    name = "transformers"

    def __init__(
        self,
        base_path: Path,
        *,
        model_id: str,
        quantize: str = "nf4",
        max_loaded: int = 8,
        max_batch: int = 32,
        max_rank: int = 64,
        max_context: int = 2048,
    ) -> None:
        self.model_id = model_id
        self.precision = Precision.of(quantize, "float32")  # the base weights as adapters see them
        self.max_rank = max_rank
        self.max_loaded = max_loaded
        self.max_batch = max_batch
        self.fingerprint = fingerprint(base_path)
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        self._pad = self.tokenizer.pad_token_id or 0
        # No token spells more characters than the longest one, so a longer text cannot fit the context.
        self._token_characters = max(len(token) for token in self.tokenizer.get_vocab())
        self._cond = threading.Condition()
        # The LoRA layers change only on the worker thread, between passes; other threads queue changes here.
        self._unloading: set[str] = set()  # keys `unload` asked the worker to drop
        self._free = list(range(max_loaded))  # a heap of the LoRA layers' unused adapter slots
        self._slot: dict[str, int] = {}
        self._sweeps = 0  # passes of the worker over pending adapters, so that `load` can wait for one
        self._waiting: deque[Generation] = deque()
        self._running: list[_Row] = []
        self._loaded: OrderedDict[str, tuple[str, ...]] = OrderedDict()  # key -> the layers its slot changes
        self._pending: dict[str, AdapterWeights] = {}  # read from disk, waiting for a free place
        self._users: Counter[str] = Counter()  # generations admitted per adapter: these are never evicted
        # Asked for by `load`, to be read by the worker, with the `load` calls waiting for each.
        self._reading: dict[str, tuple[AdapterSpec, list[_LoadWait]]] = {}
        # Request id -> its generation, queued or running. A lock of its own: `abort` and a generation's end run on
        # the event loop, which must never wait for the worker's lock.
        self._ids: dict[str, Generation] = {}
        self._ids_lock = threading.Lock()
        self._loads = self._evictions = 0
        self._passes: Counter[int] = Counter()  # rows per forward pass -> passes
        self._closed = False
        # Every torch operation runs on the worker thread, model loading included: OpenMP gives each thread
        # that computes its own team of threads, and two teams on the same cores slow every operation down.
        started: list[BaseException | None] = []
        self._worker = threading.Thread(
            target=self._run, args=(base_path, quantize, max_context, started), name="engine", daemon=True
        )
        self._worker.start()
        with self._cond:
            self._cond.wait_for(lambda: started)
        if started[0] is not None:
            raise started[0]

    def _run(self, base_path: Path, quantize: str, max_context: int, started: list[BaseException | None]) -> None:
        """The worker thread: load the model, then run the batch loop."""
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                base_path,
                dtype=torch.float32,
                use_safetensors=True,
                quantization_config=quantization_config(quantize, torch.float32),
            ).eval()
            # Each batch row keeps room for the longest running request, so the context bounds memory too.
            self.context_length = min(int(self.model.config.max_position_embeddings), max_context)
            self.prompt_characters = self.context_length * self._token_characters
            self._backbone = self.model.get_decoder()
            self._head = self.model.get_output_embeddings()
            self._rows = Rows()
            self._layers = wrap_linears(self.model, self._rows, self.max_loaded)
            self._cache = RowCache(self.max_batch)
            self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
            self._grammars = Grammars(self.tokenizer, self.vocab_size)
            eos = self.model.generation_config.eos_token_id
            self._eos = (set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}) - {None}
        except BaseException as exc:  # the constructor raises it in the caller's thread
            started.append(exc)
        else:
            started.append(None)
        finally:
            with self._cond:
                self._cond.notify_all()
        if started[0] is None:
            self._loop()

    # The HTTP-facing contract.

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([token]) for token in ids]

    def tokenizer_info(self) -> dict[str, Any]:
        tokens = {name: getattr(self.tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return {
            "tokenizer_class": type(self.tokenizer).__name__,
            **tokens,
            "chat_template": self.tokenizer.chat_template,
            "model_max_length": self.context_length,
            "vocab_size": len(self.tokenizer),
        }

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def load(self, adapter: AdapterSpec) -> bool:
        return await asyncio.to_thread(self._load, adapter)

    async def unload(self, key: str) -> bool:
        return await asyncio.to_thread(self._unload, key)

    def check(self, request: GenerateRequest) -> None:
        super().check(request)
        if request.sampling.json_schema is not None:
            self._grammars.check(request.sampling.json_schema)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.check(request)
        generation = Generation(request)
        with self._ids_lock:
            if request.request_id in self._ids:
                raise InvalidRequest(f"Request id {request.request_id!r} is already running.")
            self._ids[request.request_id] = generation
        with self._cond:
            self._waiting.append(generation)
            self._cond.notify_all()  # the worker and `load` calls wait on this condition: wake the worker for sure
        try:
            while True:
                item = await generation._queue.get()
                if item is _ABORTED:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            generation.cancelled = True  # the consumer left (or it ended): the worker drops its row
            with self._ids_lock:
                if self._ids.get(request.request_id) is generation:
                    del self._ids[request.request_id]

    async def abort(self, request_id: str) -> None:
        with self._ids_lock:
            generation = self._ids.get(request_id)
        if generation is not None and not generation.cancelled:
            generation.cancelled = True
            generation.publish(_ABORTED)

    def status(self) -> EngineStatus:
        with self._cond:
            waiting = list(self._waiting)
            running = [row.generation for row in self._running]
            return EngineStatus(
                running=len(running),
                waiting=len(waiting),
                running_adapters=tuple(sorted({g.adapter.key for g in running if g.adapter})),
                waiting_adapters=tuple(sorted({g.adapter.key for g in waiting if g.adapter})),
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

    # Adapters: an LRU of installed ones; those in use by a row are never evicted.

    def _load(self, adapter: AdapterSpec) -> bool:
        with self._cond:
            if adapter.key in self._loaded:
                self._loaded.move_to_end(adapter.key)
                return False
            if adapter.key in self._pending:
                return True
            wait = _LoadWait()
            self._reading.setdefault(adapter.key, (adapter, []))[1].append(wait)
            self._cond.notify_all()
            self._cond.wait_for(lambda: wait.done or self._closed)
        if wait.error is not None:
            raise wait.error
        return True

    def _unload(self, key: str) -> bool:
        with self._cond:
            if key not in self._loaded or self._users[key]:
                return False
            self._unloading.add(key)
            self._await_sweep()
            return key not in self._loaded

    def _await_sweep(self) -> None:
        """Wake the worker and wait (holding nothing) until it has applied the queued adapter changes."""
        sweeps = self._sweeps
        self._cond.notify_all()
        self._cond.wait_for(lambda: self._sweeps > sweeps or self._closed)

    def _apply_loads(self, reading: dict[str, tuple[AdapterSpec, list[_LoadWait]]]) -> None:
        """Read the adapters `load` asked for and install those that fit; every waiting `load` gets its answer."""
        errors: dict[str, AdapterLoadFailed] = {}
        broken: str | None = "the engine failed while loading it; see the server log."  # until the end is reached
        try:
            for key, (adapter, _) in reading.items():  # outside the lock: requests keep arriving meanwhile
                try:
                    weights = self._read(adapter)
                except AdapterLoadFailed as exc:
                    errors[key] = exc
                    continue
                with self._cond:
                    self._pending[key] = weights
            with self._cond:
                errors.update(self._sweep())
            broken = None
        finally:
            with self._cond:
                for key, (_, waits) in reading.items():
                    error = errors.get(key) or (broken and AdapterLoadFailed(key, broken))
                    for wait in waits:
                        wait.done, wait.error = True, error
                self._cond.notify_all()

    def _read(self, adapter: AdapterSpec) -> AdapterWeights:
        """The adapter's weights; any failure to read them is its rejection, never the engine's."""
        try:
            return read_adapter(adapter.key, adapter.path, self._layers, self.max_rank)
        except AdapterLoadFailed:
            raise
        except Exception as exc:
            log.exception("Reading adapter %s failed.", adapter.key)
            raise AdapterLoadFailed(adapter.key, f"its files cannot be read ({type(exc).__name__}: {exc}).") from None

    def _place(self, weights: AdapterWeights) -> bool:
        """Install WEIGHTS, evicting the least recently used idle adapter if full; False when all are busy."""
        if weights.key in self._loaded:  # read twice: a request brought it in while a `load` had it read again
            self._pending.pop(weights.key, None)
            return True
        if len(self._loaded) >= self.max_loaded:
            idle = next((key for key in self._loaded if not self._users[key]), None)
            if idle is None:
                return False
            self._evict(idle)
            self._evictions += 1
        slot = self._slot[weights.key] = heapq.heappop(self._free)  # the lowest: passes read slots up to the highest
        try:
            install(weights, slot, self._layers)
        except Exception:  # leave the slot clear and free: no pass may read half an adapter
            uninstall(tuple(weights.pairs), slot, self._layers)
            del self._slot[weights.key]
            heapq.heappush(self._free, slot)
            raise
        self._loaded[weights.key] = tuple(weights.pairs)  # the slots hold the weights now
        self._pending.pop(weights.key, None)
        self._loads += 1
        return True

    def _evict(self, key: str) -> None:
        slot = self._slot.pop(key)
        uninstall(self._loaded.pop(key), slot, self._layers)
        heapq.heappush(self._free, slot)

    def _sweep(self) -> dict[str, AdapterLoadFailed]:
        """Apply queued changes to the layers: drop unloaded adapters, install read ones while there is room.

        Returns the adapters that failed to install, which leave the pending set.
        """
        failed = {}
        try:
            for key in self._unloading:
                if key in self._loaded and not self._users[key]:
                    self._evict(key)
            self._unloading.clear()
            for weights in list(self._pending.values()):
                try:
                    if not self._place(weights):
                        break  # every place is busy: the rest wait in _pending
                except Exception as exc:
                    log.exception("Installing adapter %s failed.", weights.key)
                    del self._pending[weights.key]
                    failed[weights.key] = AdapterLoadFailed(
                        weights.key, f"installing it failed ({type(exc).__name__})."
                    )
        finally:
            self._sweeps += 1  # `unload` waits for this, so it counts even when a change failed
            self._cond.notify_all()
        return failed

    # The batch loop.

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._cond.wait_for(
                        lambda: (
                            self._closed
                            or self._waiting
                            or self._running
                            or self._pending
                            or self._unloading
                            or self._reading
                        )
                    )
                    if self._closed:
                        return
                    reading, self._reading = self._reading, {}
                admitted: list[Generation] = []
                try:
                    self._apply_loads(reading)
                    with self._cond:
                        admitted, new = self._admit()
                    self._step(admitted, new)
                except Exception as exc:  # keep serving: fail this step's generations, then go on
                    log.exception("The engine failed a batch step; its requests get an error.")
                    running = [row.generation for row in self._running]
                    self._fail([g for g in admitted if g not in running] + running, exc)

    def _admit(self) -> tuple[list[Generation], dict[str, AdapterSpec]]:
        """Take waiting generations that fit the batch and whose adapter is loaded or has a place to load into.

        Returns them and the adapters to load first. An admitted generation makes its adapter busy at once, so
        the places promised to new adapters are never taken by eviction-proof busy ones.
        """
        admitted: list[Generation] = []
        new: dict[str, AdapterSpec] = {}
        for generation in list(self._waiting):
            if len(admitted) >= self.max_batch - len(self._running):
                break
            if generation.cancelled:
                self._waiting.remove(generation)
                continue
            adapter = generation.adapter
            taken = sum(1 for key in self._loaded if self._users[key]) + len(new)  # places in use or promised
            if adapter is not None and not self._users[adapter.key] and taken >= self.max_loaded:
                continue  # it would need a place of its own and none is free: wait for a row to finish
            if adapter is not None and adapter.key not in self._loaded and adapter.key not in new:
                new[adapter.key] = adapter
            elif adapter is not None and adapter.key in self._loaded:
                self._loaded.move_to_end(adapter.key)
            if adapter is not None:
                self._users[adapter.key] += 1
            self._waiting.remove(generation)
            admitted.append(generation)
        if len(self._pending) > self.max_batch:  # requests that went away before a place was free
            wanted = {g.adapter.key for g in self._waiting if g.adapter}
            for key in [key for key in self._pending if key not in wanted]:
                del self._pending[key]
        return admitted, new

    def _step(self, admitted: list[Generation], new: dict[str, AdapterSpec]) -> None:
        for key, adapter in new.items():
            with self._cond:
                weights = self._pending.pop(key, None)
            try:
                weights = weights or self._read(adapter)  # read here only if it was not loaded ahead
                with self._cond:
                    if not self._place(weights):  # a bug: the admission promised it a place
                        raise RuntimeError(f"no place for {key}, which the admission promised one")
            except Exception as exc:  # this adapter's requests fail; the others go on
                if not isinstance(exc, AdapterLoadFailed):
                    log.exception("Installing adapter %s failed.", key)
                failed = [g for g in admitted if g.adapter is not None and g.adapter.key == key]
                admitted[:] = [g for g in admitted if g not in failed]
                self._fail(failed, exc)
        if admitted:
            failed = self._prefill_apart(admitted)
            admitted[:] = [g for g in admitted if g not in failed]  # failed and released: not this step's any more
        self._drop_finished()
        if self._running:
            self._decode()
            self._drop_finished()

    def _prefill_apart(self, generations: list[Generation]) -> list[Generation]:
        """Prefill GENERATIONS together; if that fails, each alone, so that only those that fail alone fail.

        Returns the failed ones.
        """
        try:
            self._prefill(generations)
        except Exception as exc:
            if len(generations) == 1:
                log.exception("The engine failed a request's prompt; it gets an error.")
                self._fail(generations, exc)
                return generations
            return [failed for generation in generations for failed in self._prefill_apart([generation])]
        return []

    def _prefill(self, generations: list[Generation]) -> None:
        first = len(self._running)
        rows = [self._new_row(g) for g in generations]
        lengths = torch.tensor([len(g.prompt_ids) for g in generations])
        longest = int(lengths.max())
        ids = torch.full((len(rows), longest), self._pad, dtype=torch.long)
        for i, generation in enumerate(generations):
            ids[i, : len(generation.prompt_ids)] = torch.tensor(generation.prompt_ids)
        positions = torch.arange(longest)
        causal = positions[None, :] <= positions[:, None]
        mask = causal[None, :, :] & (positions[None, None, :] < lengths[:, None, None])
        self._cache.reserve(first + len(rows), longest)
        self._cache.prefill(first)
        self._rows.plan = plan(self._slots(rows), longest)
        hidden = self._forward(ids, mask[:, None], positions.expand(len(rows), -1))
        logits = self._head(hidden[torch.arange(len(rows)), lengths - 1])
        for i, generation in enumerate(generations):
            if generation.sampling.prompt_logprobs is not None:
                length = len(generation.prompt_ids)
                scores = self._head(hidden[i, : length - 1])  # each position scores the next prompt token
                generation.prompt_logprobs = _logprobs(
                    scores, ids[i, 1:length].tolist(), generation.sampling.prompt_logprobs
                )
        for row, length in zip(rows, lengths.tolist(), strict=True):
            row.length = length
        self._running.extend(rows)  # last: until here a failure leaves the batch as it was, to prefill again
        self._passes[len(rows)] += 1
        self._advance(rows, logits)

    def _decode(self) -> None:
        rows = self._running
        positions = torch.tensor([row.length for row in rows])
        self._cache.reserve(len(rows), int(positions.max()) + 1)
        self._cache.decode(positions)
        self._rows.plan = plan(self._slots(rows), 1)
        keys = torch.arange(int(positions.max()) + 1)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
        ids = torch.tensor([[row.last] for row in rows])
        hidden = self._forward(ids, mask, positions[:, None])
        for row in rows:
            row.length += 1
        self._passes[len(rows)] += 1
        self._advance(rows, self._head(hidden[:, -1]))

    def _slots(self, rows: list[_Row]) -> list[int | None]:
        return [None if row.key is None else self._slot[row.key] for row in rows]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self._backbone(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self._cache, use_cache=True
        )
        return out.last_hidden_state

    def _new_row(self, generation: Generation) -> _Row:
        generator = torch.Generator()
        if generation.sampling.seed is not None:
            generator.manual_seed(generation.sampling.seed)
        else:
            generator.seed()
        schema = generation.sampling.json_schema
        matcher = self._grammars.matcher(schema) if schema is not None else None
        return _Row(generation, TextStream(self.tokenizer, generation.sampling.stop), generator, matcher=matcher)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token, send the new text of every row at once, and mark finished rows.

        A row whose logits are not finite, or whose token cannot be picked or decoded, fails alone.
        """
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        raw = logits  # log-probabilities report the model's own distribution, before penalties and biases
        if any(row.generation.sampling.adjusted for row in rows):
            logits = logits.clone()
            for i, row in enumerate(rows):
                if row.generation.sampling.adjusted:
                    _adjust(logits[i], row)
                    if row.matcher is not None:
                        self._grammars.restrict(row.matcher, logits[i])
        greedy = logits.argmax(dim=-1).tolist()
        outbox: list[tuple[Generation, Chunk | BaseException | None]] = []
        for i, row in enumerate(rows):
            generation = row.generation
            if generation.cancelled:  # aborted while this pass ran: nothing more is sent
                continue
            chunk: Chunk | BaseException
            try:
                if not finite[i]:
                    raise _NonFinite(row.key)
                chunk = self._next(row, greedy[i], logits[i], raw[i])
                if not generation.started and generation.prompt_logprobs is not None:
                    chunk = replace(chunk, prompt_logprobs=tuple(generation.prompt_logprobs))
                generation.started = True
            except Exception as exc:
                if not isinstance(exc, EngineError):
                    log.exception("The engine failed one row; its request gets an error.")
                chunk = _failure(exc)
            outbox.append((generation, chunk))
            if isinstance(chunk, BaseException) or chunk.finish_reason:
                generation.cancelled = True  # finished or failed: the row leaves the batch
        deliver(outbox)

    def _next(self, row: _Row, greedy: int, logits: torch.Tensor, raw: torch.Tensor) -> Chunk:
        """Pick ROW's next token and say what text it adds and whether the generation ends there."""
        generation, sampling = row.generation, row.generation.sampling
        token = greedy if sampling.temperature == 0 else _sample(logits, sampling, row.generator)
        generation.completion_tokens += 1
        row.last = token
        if sampling.adjusted:
            row.counts = row.counts or {}
            row.counts[token] = row.counts.get(token, 0) + 1
        scored = () if sampling.logprobs is None else tuple(_logprobs(raw[None], [token], sampling.logprobs))
        ids = (token,)
        if row.matcher is not None:
            row.matcher.consume_token(token)  # the mask let through only tokens the grammar accepts
            if row.matcher.is_stopped():  # the JSON is whole: it ends here, as at end-of-sequence
                text = "" if token in self._eos else row.stream.push(token)[0]
                return Chunk(text + row.stream.rest(), ids, "stop", scored)
        if token in sampling.stop_token_ids:
            return Chunk(row.stream.rest(), ids, "stop", scored)
        if token in self._eos and not sampling.ignore_eos:
            return Chunk(row.stream.rest(), ids, "stop", scored)
        text, stopped = row.stream.push(token)
        if stopped:
            return Chunk(text, ids, "stop", scored)
        if generation.completion_tokens >= sampling.max_tokens or row.length + 1 >= self.context_length:
            return Chunk(text + row.stream.rest(), ids, "length", scored)
        return Chunk(text, ids, None, scored)

    def _drop_finished(self) -> None:
        """Free the rows of finished or cancelled generations; the last row moves into each gap."""
        for i in range(len(self._running) - 1, -1, -1):
            row = self._running[i]
            if not row.generation.cancelled:
                continue
            last = self._running.pop()
            if last is not row:
                self._cache.move(len(self._running), i)
                self._running[i] = last
            self._release(row.generation)
        self._cache.shrink(len(self._running), max((row.length for row in self._running), default=0) + 1)

    def _release(self, generation: Generation) -> None:
        """An admitted generation is done: its adapter may be evicted again."""
        if generation.adapter is not None:
            with self._cond:
                self._users[generation.adapter.key] -= 1

    def _fail(self, generations: list[Generation], exc: BaseException) -> None:
        """End GENERATIONS with EXC: rows leave the batch, admitted ones not yet in it are released."""
        running = {id(row.generation) for row in self._running}
        error = _failure(exc)
        for generation in generations:
            generation.publish(error)
            generation.cancelled = True
            if id(generation) not in running:
                self._release(generation)
        self._drop_finished()


def _failure(exc: BaseException) -> EngineError:
    """EXC as the engine-neutral error its request raises (the details went to the log)."""
    if isinstance(exc, EngineError):
        return exc
    return GenerationFailed(f"The engine failed on this request ({type(exc).__name__}); see the server log.")


class _NonFinite(GenerationFailed):
    """A row's logits hold inf or NaN: its adapter's weights (or the prompt) overflow the model's numbers."""

    def __init__(self, adapter: str | None) -> None:
        by = f"adapter {adapter}" if adapter else "the base model"
        super().__init__(f"The model's output for this request is not finite (NaN or inf) with {by}; it was stopped.")


def _adjust(logits: torch.Tensor, row: _Row) -> None:
    """Apply ROW's presence and frequency penalties and logit biases to its logits, in place (OpenAI's formula)."""
    sampling = row.generation.sampling
    if row.counts:
        tokens = torch.tensor(list(row.counts))
        counts = torch.tensor(list(row.counts.values()), dtype=logits.dtype)
        logits[tokens] -= sampling.presence_penalty + sampling.frequency_penalty * counts
    for token, bias in sampling.logit_bias:
        logits[token] += bias


def _logprobs(scores: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each position's log-probability of its token under SCORES (one row of logits per token), with the TOP
    most likely tokens there."""
    if not tokens:
        return []
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    if top:
        values, ids = logprobs.topk(top, dim=-1)
        tops = [tuple(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, lp, best) for t, lp, best in zip(tokens, chosen, tops)]


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Draw a token with temperature and nucleus (top-p) sampling from the row's own seeded generator."""
    # Double precision: a tiny temperature (vLLM's floor is 0.01) must not overflow the scaled logits.
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
