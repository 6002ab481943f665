"""The transformers engine: one HF base model (optionally NF4/int8), many LoRA adapters, continuous batching.

The contract and the worker thread live here; the adapter slots (`slots.py`), the admission policy (`admission.py`)
and the batch runner (`runner.py`) are the parts the worker drives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterctl.core.base import fingerprint
from adapterctl.core.precision import Precision, quantization_config
from adapterctl.serve.engines.transformers.admission import Admission
from adapterctl.serve.engines.base import (
    ABORTED,
    AdapterLoadFailed,
    AdapterSpec,
    Chunk,
    Engine,
    EngineDead,
    EngineStatus,
    EngineUnavailable,
    GenerateRequest,
    InvalidRequest,
    Sampling,
    received,
)
from adapterctl.serve.engines.transformers.generation import Generation
from adapterctl.serve.engines.grammar import Grammars
from adapterctl.serve.engines.tokenizer import HFTokenizer
from adapterctl.serve.engines.transformers.kvcache import BLOCK
from adapterctl.serve.engines.transformers.lora import (
    AdapterWeights,
    SharedPlan,
    install,
    read_adapter,
    uninstall,
    wrap_linears,
)
from adapterctl.serve.engines.transformers.runner import Runner, fail
from adapterctl.serve.engines.transformers.slots import IN_SLOT, Adapter, Slots, State
from adapterctl.serve.engines.transformers.threads import Threads

log = logging.getLogger("serve")

# A prompt's tokens per step (in the pass that gives running rows their next token): what a long prompt adds to each
# of their steps. Smaller chunks delay the long prompt's own first token more.
PREFILL_CHUNK = 32
# Tokens one step's pass computes, the running rows' next tokens included: what running rows' next token waits for at
# most. On the embedded model on two cores (bench/scheduling.py), 16 streams' inter-token p95 while 32 prompts of 60
# tokens arrived was 3.1 s with the burst in one pass, 0.29 s with 64, 0.41 s with 128 and 0.68 s with 256; the
# burst's last first token came after 3.3 s, 9.8, 6.2 and 4.5 s.
MAX_BATCHED_TOKENS = 128
# Memory for keys and values: the block cache never holds more, and a request is admitted only when its blocks fit.
# On the embedded model (float32, 45 KB per token) 2 GiB hold 46,600 tokens: 22 requests of the whole context.
KV_CACHE_GB = 2.0
# While rows run, a step boundary reads adapters for as long as the last step took, and at least this many seconds
# (a read and install takes 15-20 ms on the embedded model on two cores): a burst of loads gets half the machine and
# the running rows' next token waits at most about twice as long.
LOAD_BUDGET = 0.1


class TransformersEngine(HFTokenizer, Engine):
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
        prefill_chunk: int = PREFILL_CHUNK,
        max_batched_tokens: int = MAX_BATCHED_TOKENS,
        kv_cache_gb: float = KV_CACHE_GB,
    ) -> None:
        self.model_id = model_id
        self.precision = Precision.of(quantize, "float32")  # the base weights as adapters see them
        self.max_rank = max_rank
        self.max_loaded = max_loaded
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_batched_tokens = max_batched_tokens
        self.kv_cache_gb = kv_cache_gb
        self.fingerprint = fingerprint(base_path)
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        self._cond = threading.Condition()  # guards the queue and the slots; the worker waits on it for work
        # The LoRA layers change only on the worker thread, between passes; other threads ask through the slots.
        # Idle adapters stay within max_loaded; those running rows use may fill a slot per row of the batch.
        slots = max(max_loaded, max_batch)
        # The layers grow to max_loaded slots at the first install, then double (rarely: growing copies every slot).
        self._slots = Slots(
            slots,
            lambda weights, slot: install(weights, slot, self._layers, min(slots, max(max_loaded, 2 * slot))),
            lambda modules, slot: uninstall(modules, slot, self._layers),
            keep=max_loaded,
        )
        self._waiting: deque[Generation] = deque()
        # Request id -> its generation, queued or running. A lock of its own: `abort` and a generation's end run on
        # the event loop, which must never wait for the worker's lock.
        self._ids: dict[str, Generation] = {}
        self._ids_lock = threading.Lock()
        self._closed = False
        self._dead: str | None = None  # why the batch loop ended without being closed
        # `load` calls waiting for their adapter to settle: the worker resolves each future on its caller's loop.
        self._asked: list[tuple[Adapter, Callable[[], object]]] = []
        self._step_seconds = 0.0  # how long the last batch step took
        self._holds = 0  # `paused` calls holding the batch loop at a step boundary
        self._between_steps = False  # the batch loop waits at a step boundary
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
            self.threads = Threads()  # torch's threads are this thread's: it sets them
            self.threads.adjust()
            model = AutoModelForCausalLM.from_pretrained(
                base_path,
                dtype=torch.float32,
                use_safetensors=True,
                quantization_config=quantization_config(quantize, torch.float32),
            ).eval()
            # Each batch row keeps room for the longest running request, so the context bounds memory too.
            self.context_length = min(int(model.config.max_position_embeddings), max_context)
            self.prompt_characters = self.context_length * self._token_characters()
            rows = SharedPlan()
            self._layers = wrap_linears(model, rows)
            self.vocab_size = int(model.get_input_embeddings().num_embeddings)
            self._grammars = Grammars(self.tokenizer, self.vocab_size)  # its token table: now, not at a first schema
            self.kv_blocks = int(self.kv_cache_gb * (1 << 30) // block_bytes(model.config))
            self._admission = Admission(self._slots, self.max_batch, self.kv_blocks, self.context_length)
            eos = model.generation_config.eos_token_id
            self._runner = Runner(
                model,
                self.tokenizer,
                rows,
                max_batch=self.max_batch,
                context_length=self.context_length,
                grammars=self._grammars,
                prefill_chunk=self.prefill_chunk,
                max_batched_tokens=self.max_batched_tokens,
                capacity=self.kv_blocks,
                eos=(set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}) - {None},
            )
        except BaseException as exc:  # the constructor raises it in the caller's thread
            started.append(exc)
        else:
            started.append(None)
        finally:
            with self._cond:
                self._notify()
        if started[0] is None:
            try:
                self._loop()
            except BaseException as exc:  # past a step's own handling: nothing would ever run again
                self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """The batch loop ended on EXC: the engine is dead; every queued and running generation and `load` call
        gets EngineDead."""
        log.critical("The engine's batch loop died; the server stops so that it can be restarted.", exc_info=exc)
        with self._cond:
            self._dead = f"its batch loop stopped on {type(exc).__name__}; see the server log"
            self._waiting.clear()
            with self._ids_lock:  # queued, admitted or running: wherever the loop left them
                unfinished = [g for g in self._ids.values() if not g.cancelled]
            fail(unfinished, EngineDead(self._dead))
            self._notify()

    # The HTTP-facing contract.

    @property
    def dead(self) -> str | None:
        return self._dead

    async def load(self, adapter: AdapterSpec) -> bool:
        if self._dead is not None:
            raise EngineDead(self._dead)
        # The wait is a future the worker resolves, not a blocked thread: the default executor's few threads stay
        # free for other requests' work (tokenizing), however many loads wait for a step boundary.
        loop = asyncio.get_running_loop()
        answered = loop.create_future()
        asked = await asyncio.to_thread(self._ask, adapter, lambda: loop.call_soon_threadsafe(_answer, answered))
        if asked is None:
            return False
        await answered
        if asked.error is not None:
            raise asked.error
        if not asked.settled and self._dead is not None:
            raise EngineDead(self._dead)
        return True

    async def unload(self, key: str) -> bool:
        return await asyncio.to_thread(self._unload, key)

    def check(self, request: GenerateRequest) -> None:
        super().check(request)
        if (need := self._admission.blocks(request)) > self._admission.largest:
            raise InvalidRequest(
                f"The prompt and max_tokens need {need} blocks of {BLOCK} tokens; this server's cache holds "
                f"{self._admission.largest} for one request (--kv-cache-gb): send a lower max_tokens.",
                param="max_tokens",
            )

    async def prepare(self, samplings: list[Sampling]) -> list[Sampling]:
        return await self._grammars.prepare(samplings)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.check(request)
        if request.sampling.json_schema is not None and request.sampling.grammar is None:  # not `prepare`d above
            request = replace(request, sampling=(await self.prepare([request.sampling]))[0])
        generation = Generation(request, resumed=self._wake)
        with self._ids_lock:
            if request.request_id in self._ids:
                raise InvalidRequest(f"Request id {request.request_id!r} is already running.")
            self._ids[request.request_id] = generation
        with self._cond:
            if self._dead is not None:  # it died since `check`: no worker would ever take this generation
                generation.publish(EngineDead(self._dead))
            elif self._closed:  # nor after `close`: an answer, not a wait for ever
                generation.publish(EngineUnavailable("The engine was closed; it serves nothing more."))
            else:
                self._waiting.append(generation)
                self._notify()  # the worker and `unload` calls wait on this condition: wake the worker for sure
        try:
            async for chunk in received(generation.queue):
                generation.take()
                yield chunk
        finally:
            behind = generation.behind
            generation.cancelled = True  # the consumer left (or it ended): the worker drops its row
            if behind:  # its row may be parked, the worker waiting with nothing else to do
                self._wake()
            with self._ids_lock:
                if self._ids.get(request.request_id) is generation:
                    del self._ids[request.request_id]

    async def abort(self, request_id: str) -> None:
        with self._ids_lock:
            generation = self._ids.get(request_id)
        if generation is not None and not generation.cancelled:
            generation.cancelled = True
            generation.publish(ABORTED)

    def status(self) -> EngineStatus:
        with self._cond:
            waiting = list(self._waiting)
            running = self._runner.generations()
            return EngineStatus.of(
                [g.adapter.key if g.adapter else None for g in running],
                [g.adapter.key if g.adapter else None for g in waiting],
                loaded=self._slots.loaded(),
                max_loaded=self.max_loaded,
                loads=self._slots.loads,
                evictions=self._slots.evictions,
                passes=dict(self._runner.passes),
                kv_cache_usage=self._runner.cache.held() / self._runner.cache.capacity,
            )

    @property
    def parked(self) -> int:
        """Running generations whose reader is behind: their rows sit out passes until it catches up."""
        with self._cond:
            return len(self._runner.parked)

    @contextlib.contextmanager
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

    async def close(self) -> None:
        with self._cond:
            self._closed = True
            self._notify()
        await asyncio.to_thread(self._worker.join)

    # Adapters, asked for from other threads: the worker reads and installs them between steps.

    def _ask(self, spec: AdapterSpec, answer: Callable[[], object]) -> Adapter | None:
        """Ask the worker for SPEC's adapter, to ANSWER once it is settled; None when it is in a slot already."""
        with self._cond:
            adapter = self._slots.get(spec.key)
            if adapter is not None and adapter.state in IN_SLOT:
                self._slots.touch(adapter)
                return None
            adapter = self._slots.request(spec)
            self._asked.append((adapter, answer))
            self._notify()
        return adapter

    def _wake(self) -> None:
        """A parked row's reader caught up: wake the worker if it waits with nothing else to do."""
        with self._cond:
            self._cond.notify_all()

    def _notify(self) -> None:
        """Wake the threads waiting on the condition; answer the `load` calls whose adapter has settled (lock held)."""
        self._cond.notify_all()
        waiting = []
        for adapter, answer in self._asked:
            if adapter.settled or self._closed or self._dead is not None:
                with contextlib.suppress(RuntimeError):  # its event loop is closed: nobody waits for the answer
                    answer()
            else:
                waiting.append((adapter, answer))
        self._asked = waiting

    def _unload(self, key: str) -> bool:
        with self._cond:
            adapter = self._slots.unload(key)
            if adapter is None:
                return False
            sweeps = self._slots.sweeps
            self._notify()  # wake the worker and wait (holding nothing) until it has swept
            self._cond.wait_for(lambda: self._slots.sweeps > sweeps or self._closed or self._dead is not None)
            return adapter.state is State.GONE

    def _apply_loads(self, reading: list[Adapter]) -> None:
        """Read the adapters `load` asked for and install each that fits as soon as it is read; every one read is
        answered. While rows run, reading stops when the budget is spent (the rest wait for the next step)."""
        started, budget, attempted = time.monotonic(), self._load_budget(), []
        try:
            for adapter in reading:  # outside the lock: requests keep arriving meanwhile
                if attempted and self._runner.rows and time.monotonic() - started >= budget:
                    break
                attempted.append(adapter)
                try:
                    weights = self._read(adapter.spec)
                except AdapterLoadFailed as exc:
                    with self._cond:
                        self._slots.reject(adapter, exc)
                        self._notify()
                    continue
                with self._cond:
                    self._slots.read(adapter, weights)
                    self._slots.sweep()  # installed at once: its `load` is answered without waiting for the others
                    self._notify()
            with self._cond:
                self._slots.sweep()
        finally:
            with self._cond:
                for adapter in attempted:
                    if not adapter.settled:  # the engine failed on the way: its `load` calls get that error
                        broken = "the engine failed while loading it; see the server log."
                        self._slots.reject(adapter, AdapterLoadFailed(adapter.key, broken))
                self._notify()

    def _load_budget(self) -> float:
        """Seconds this step boundary may spend reading adapters while rows run."""
        return max(LOAD_BUDGET, self._step_seconds)

    def _read(self, spec: AdapterSpec) -> AdapterWeights:
        """The adapter's weights; any failure to read them is its rejection, never the engine's."""
        try:
            return read_adapter(spec.key, spec.path, self._layers, self.max_rank)
        except AdapterLoadFailed:
            raise
        except Exception as exc:
            log.exception("Reading adapter %s failed.", spec.key)
            raise AdapterLoadFailed(spec.key, f"its files cannot be read ({type(exc).__name__}: {exc}).") from None

    # The batch loop.

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._between_steps = True
                    if self._holds:  # a `paused` call waits for this boundary
                        self._cond.notify_all()
                    self._cond.wait_for(lambda: self._closed or (not self._holds and self._has_work()))
                    self._between_steps = False
                    if self._closed:
                        return
                    reading = self._slots.in_state(State.READING)
                admitted: list[Generation] = []
                try:
                    self.threads.adjust()
                    self._apply_loads(reading)
                    with self._cond:
                        admitted, new = self._admission.admit(self._waiting, self._runner.generations())
                    started = time.monotonic()
                    self._step(admitted, new)
                    self._step_seconds = time.monotonic() - started
                except Exception as exc:  # keep serving: fail this step's generations, then go on
                    log.exception("The engine failed a batch step; its requests get an error.")
                    running = self._runner.generations()
                    self._fail([g for g in admitted if g not in running] + running, exc)

    def _has_work(self) -> bool:
        return bool(
            self._closed
            or self._waiting
            or self._runner.busy()
            or self._slots.in_state(State.READING, State.PENDING, State.UNLOADING)
        )

    def _step(self, admitted: list[Generation], new: list[Adapter]) -> None:
        """Install the adapters admitted generations need, then run one pass: every running row's next token and
        parts of prompts, within the budget (`Runner`)."""
        for adapter in new:
            try:
                self._install(adapter)
            except Exception as exc:  # this adapter's requests fail; the others go on
                if not isinstance(exc, AdapterLoadFailed):
                    log.exception("Installing adapter %s failed.", adapter.key)
                failed = [g for g in admitted if g.pinned is adapter]
                admitted[:] = [g for g in admitted if g not in failed]
                self._fail(failed, exc)
        self._runner.admit(admitted)
        self._runner.park()
        self._runner.step()
        self._retire()

    def _install(self, adapter: Adapter) -> None:
        """Read ADAPTER unless `load` did, and install it in the slot the admission promised; rejected if it fails."""
        try:
            weights = self._read(adapter.spec) if adapter.state is State.READING else None
            with self._cond:
                if weights is not None:
                    self._slots.read(adapter, weights)
                if not self._slots.place(adapter):  # a bug: the admission promised it a place
                    raise RuntimeError(f"no place for {adapter.key}, which the admission promised one")
                self._notify()  # `load` calls that joined it meanwhile have their answer
        except Exception as exc:
            with self._cond:
                if adapter.state in (State.READING, State.PENDING):  # its `load` calls get the same answer
                    error = exc if isinstance(exc, AdapterLoadFailed) else None
                    reason = f"installing it failed ({type(exc).__name__})."
                    self._slots.reject(adapter, error or AdapterLoadFailed(adapter.key, reason))
                    self._notify()
            raise

    def _leave(self, generations: list[Generation]) -> None:
        """GENERATIONS are done: their adapters may be evicted again, those beyond max_loaded at once."""
        with self._cond:
            for generation in generations:
                if generation.pinned is not None:
                    self._slots.unpin(generation.pinned)
                    generation.pinned = None
            self._slots.trim()

    def _retire(self) -> None:
        """Finished rows leave the batch and release their adapters under one hold, so `status` never sees half."""
        with self._cond:
            self._leave(self._runner.drop_finished())

    def _fail(self, generations: list[Generation], exc: BaseException) -> None:
        """End GENERATIONS with EXC: rows leave the batch, admitted ones not yet in it are released."""
        running = {id(g) for g in self._runner.generations()}
        fail(generations, exc)
        self._leave([g for g in generations if id(g) not in running])
        self._retire()


def block_bytes(config: object) -> int:
    """Bytes one block of the cache takes: keys and values of every layer, float32."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # type: ignore[attr-defined]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # type: ignore[attr-defined]
    return config.num_hidden_layers * 2 * heads * dim * 4 * BLOCK  # type: ignore[attr-defined]


def _answer(answered: asyncio.Future[None]) -> None:
    if not answered.done():  # its `load` call may have been cancelled
        answered.set_result(None)
