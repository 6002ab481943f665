"""The vLLM engine: vLLM's `AsyncLLM` with LoRA, one `LoRARequest` per request, behind the engine contract.

vLLM runs its scheduler and model in a child process and talks to it from an asyncio loop. This engine gives
that loop a thread of its own, so that any caller's loop (uvicorn's, a test's `asyncio.run`) can use one engine;
calls cross over with `run_coroutine_threadsafe`, and chunks come back with `call_soon_threadsafe`.
Entry points that start it need a `__main__` guard: vLLM may spawn its child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from transformers import AutoConfig, AutoTokenizer
from vllm import SamplingParams
from vllm.config import StructuredOutputsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerBase

from adapterctl.core.base import fingerprint
from adapterctl.core.errors import BaseModelError
from adapterctl.core.precision import Precision
from adapterctl.serve.engines.base import (
    AdapterLoadFailed,
    AdapterSpec,
    Chunk,
    Engine,
    EngineDead,
    EngineError,
    EngineStatus,
    GenerateRequest,
    GenerationFailed,
    InvalidRequest,
    Sampling,
    TokenLogprob,
)
from adapterctl.serve.engines.grammar import Grammars
from adapterctl.serve.engines.tokenizer import HFTokenizer
from adapterctl.registry.folder import WEIGHTS

log = logging.getLogger(__name__)
T = TypeVar("T")
GiB = 1 << 30
_DONE = object()  # the generation ended (finished or aborted); nothing more comes
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's max_lora_rank takes
_CORE_DIED = "vLLM's engine core stopped; its error is in the server log"


@dataclass
class _Adapter:
    """An adapter version registered in vLLM, and the generations using it now (never evicted while any do)."""

    lora: LoRARequest
    users: int = 0


@dataclass
class _Request:
    """A generation of this engine: its adapter, whether vLLM has sent anything yet, and the task that runs it."""

    adapter: str | None
    task: asyncio.Task[None]
    started: bool = False


class VLLMEngine(HFTokenizer, Engine):
    """Serves a base model and many adapters with vLLM's continuous batching and its multi-LoRA kernels."""

    name = "vllm"

    def __init__(
        self,
        base_path: Path,
        *,
        model_id: str,
        dtype: str = "bfloat16",
        max_loaded: int = 8,
        max_cpu_loras: int | None = None,
        max_batch: int = 32,
        max_rank: int = 64,
        max_context: int = 2048,
        kv_cache_gb: float | None = None,
    ) -> None:
        """Start vLLM on BASE_PATH: MAX_CPU_LORAS adapters kept loaded (default MAX_LOADED), MAX_LOADED of them in
        one batch (vLLM's max_loras; on CPU all those kept), MAX_BATCH rows (max_num_seqs), KV_CACHE_GB of cache (on
        CPU default 1 GiB, or VLLM_CPU_KVCACHE_SPACE when set). The base runs as saved, in DTYPE: vLLM 0.32 has no
        bitsandbytes, so no NF4 or int8 base (`factory.EngineOptions` refuses those before any model loads)."""
        on_cpu = current_platform.is_cpu()
        kept = max_loaded if max_cpu_loras is None else max_cpu_loras
        lora_rank = next((r for r in _VLLM_RANKS if r >= max_rank), None)
        if lora_rank is None:
            raise BaseModelError(f"The vLLM engine serves LoRA ranks up to {_VLLM_RANKS[-1]}, not {max_rank}.")
        if kept < max_loaded:
            raise BaseModelError(f"--max-cpu-loras ({kept}) must be at least --max-loaded ({max_loaded}).")
        self.model_id = model_id
        self.fingerprint = fingerprint(base_path)
        self.precision = Precision.of("none", dtype)
        self.max_rank = max_rank
        self.max_loaded = kept  # adapters in memory at once
        self.max_batch = max_batch  # so tenants' fair share decides who enters vLLM's batch, not its arrival order
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        log.info("vLLM engine: the base model computes in %s, %s.", dtype, self.precision.describe())
        self._ids: dict[str, int] = {}  # adapter key -> its LoRA id for the engine's life (ids only grow)
        self._loaded: OrderedDict[str, _Adapter] = OrderedDict()  # least recently used first
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()  # `status` reads the tables above from other threads
        self._loads = self._evictions = 0
        self._passes: Counter[int] = Counter()
        self._kv_cache_usage: float | None = None  # vLLM's own figure, from its last step
        # vLLM's CPU LoRA kernels give a row without an adapter (index -1) the adapter in the last LoRA slot. vLLM
        # fills the first free slot and this engine never registers more adapters than it keeps, so one slot more
        # than that stays empty, all zeros, for base rows. (CUDA's kernels skip those rows.)
        slots = kept + 1 if on_cpu else max_loaded
        args = AsyncEngineArgs(
            model=str(base_path),
            tokenizer=str(base_path),
            dtype=dtype,
            enable_lora=True,
            max_loras=slots,
            max_cpu_loras=max(slots, kept),
            max_lora_rank=lora_rank,  # vLLM sizes its slots for one of a few ranks; the catalog checks max_rank
            max_num_seqs=max_batch,
            # As the transformers engine: --max-context within the model's own positions (vLLM refuses more).
            max_model_len=min(max_context, _positions(base_path, max_context)),
            kv_cache_memory_bytes=_kv_cache_bytes(kv_cache_gb, on_cpu),
            structured_outputs_config=StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True),
            disable_log_stats=True,
            enable_logging_iteration_details=True,  # rows per pass reach the stat logger below
        )
        # vLLM posts usage statistics to its makers from the child process unless told not to; a server of ours
        # sends nothing anywhere it was not asked to (VLLM_NO_USAGE_STATS=0 turns it back on).
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()
        try:
            self._llm: AsyncLLM = asyncio.run_coroutine_threadsafe(self._start(args), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise
        self.context_length = int(self._llm.model_config.max_model_len)
        self.max_batched_tokens = int(self._llm.vllm_config.scheduler_config.max_num_batched_tokens)
        self.vocab_size = int(self._llm.model_config.get_vocab_size())
        self._grammars = Grammars(self.tokenizer, self.vocab_size)  # the llguidance check of response_format
        self.prompt_characters = self.context_length * self._token_characters()

    async def _start(self, args: AsyncEngineArgs) -> AsyncLLM:
        """Create vLLM on the engine's loop: its output handler runs there."""
        self._freed = asyncio.Condition()  # a generation released its adapter
        self._turns = _Turns()
        self._changing = asyncio.Lock()  # one change to vLLM's adapters at a time
        stats = lambda config, index: _StepStats(self._step)  # noqa: E731
        return AsyncLLM.from_engine_args(args, stat_loggers=[stats, _NoPrometheus])

    def _step(self, scheduler_stats: Any) -> None:
        """Keep what vLLM's scheduler reports of a step: the rows of its pass and the KV cache's use."""
        details = getattr(scheduler_stats, "iteration_details", None)
        with self._lock:
            if scheduler_stats is not None:
                self._kv_cache_usage = float(scheduler_stats.kv_cache_usage)
            if details is not None and not details.is_dummy:
                self._passes[details.num_ctx_requests + details.num_generation_requests] += 1

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run CORO on the engine's loop and wait for it from the caller's; a dead engine core is EngineDead."""
        try:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))
        except EngineDeadError:
            raise EngineDead(_CORE_DIED) from None

    # The contract.

    @property
    def dead(self) -> str | None:
        return _CORE_DIED if self._llm.errored and not self._loop.is_closed() else None

    def check(self, request: GenerateRequest) -> None:
        super().check(request)
        if request.request_id in self._requests:
            raise InvalidRequest(f"Request id {request.request_id!r} is already running.")

    async def prepare(self, samplings: list[Sampling]) -> list[Sampling]:
        # The transformers engine's llguidance check: a schema it cannot follow is a 400 on both engines alike
        # (vLLM's own guidance backend compiles it again in its engine core, off this loop).
        return await self._grammars.prepare(samplings)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.check(request)
        if request.sampling.json_schema is not None and request.sampling.grammar is None:  # llguidance check: not
            await self.prepare([request.sampling])  # `prepare`d above
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def send(item: Any) -> None:
            caller.call_soon_threadsafe(queue.put_nowait, item)

        record = await self._on_loop(self._admit(request, send))
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not record.task.done():  # the consumer left early: stop vLLM's request and free its row
                await self._on_loop(_stop(record))

    async def abort(self, request_id: str) -> None:
        await self._on_loop(self._abort(request_id))

    async def load(self, adapter: AdapterSpec) -> bool:
        return await self._on_loop(self._preload(adapter))

    async def unload(self, key: str) -> bool:
        return await self._on_loop(self._unload(key))

    def status(self) -> EngineStatus:
        with self._lock:
            requests = list(self._requests.values())
            return EngineStatus.of(
                [r.adapter for r in requests if r.started],
                [r.adapter for r in requests if not r.started],
                loaded=tuple(self._loaded),
                max_loaded=self.max_loaded,
                loads=self._loads,
                evictions=self._evictions,
                passes=dict(self._passes),
                kv_cache_usage=self._kv_cache_usage,
            )

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold vLLM's scheduler between steps while inside (no step runs): for tests and operators' diagnostics."""
        pause = self._llm.pause_generation(mode="keep", clear_cache=False)  # requests stay, frozen where they are
        asyncio.run_coroutine_threadsafe(pause, self._loop).result()
        try:
            yield
        finally:
            asyncio.run_coroutine_threadsafe(self._llm.resume_generation(), self._loop).result()

    async def close(self) -> None:
        if self._loop.is_closed():
            return
        await self._on_loop(self._shutdown())
        self._stop_loop()

    async def _shutdown(self) -> None:
        self._llm.shutdown()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # Generations, on the engine's loop.

    async def _admit(self, request: GenerateRequest, send: Callable[[Any], None]) -> _Request:
        """Register REQUEST under its id and start running it (`check` ran in the caller's thread)."""
        if request.request_id in self._requests:
            raise InvalidRequest(f"Request id {request.request_id!r} is already running.")
        task = asyncio.ensure_future(self._run(request, send))
        record = _Request(request.adapter.key if request.adapter else None, task)
        with self._lock:
            self._requests[request.request_id] = record
        return record

    async def _run(self, request: GenerateRequest, send: Callable[[Any], None]) -> None:
        """Run REQUEST in vLLM and send its chunks, then _DONE or the error that ended it."""
        record = self._requests[request.request_id]
        try:
            params = self._params(request.sampling)
            lora = None
            if request.adapter is not None:
                lora = (await self._use(request.adapter, hold=True))[0].lora
            try:
                await self._turns.enter(request)
                try:
                    await self._stream(request, params, lora, record, send)
                finally:
                    self._turns.leave(request.request_id)
            finally:
                if request.adapter is not None:
                    await self._release(request.adapter.key)
        except asyncio.CancelledError:  # aborted, or the consumer left: the iteration ends without a reason
            pass
        except EngineError as exc:
            send(exc)
        except VLLMClientError as exc:  # vLLM's own validation when it takes the request
            send(InvalidRequest(str(exc)))
        except EngineDeadError:  # every running request gets this once the engine core is gone
            send(EngineDead(_CORE_DIED))
        except Exception:
            log.exception("vLLM failed request %s.", request.request_id)
            send(GenerationFailed("The engine failed on this request; see the server log."))
        finally:
            with self._lock:
                self._requests.pop(request.request_id, None)
            send(_DONE)

    async def _stream(
        self,
        request: GenerateRequest,
        params: SamplingParams,
        lora: LoRARequest | None,
        record: _Request,
        send: Callable[[Any], None],
    ) -> None:
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_ids))
        first = True
        async for output in self._llm.generate(prompt, params, request.request_id, lora_request=lora):
            record.started = True
            self._turns.scored(request.request_id)  # a first output comes once the whole prompt has run
            chunk = _chunk(output, request, first)
            first = False
            if chunk is None:  # aborted inside vLLM
                return
            if chunk.text or chunk.token_ids or chunk.finish_reason or chunk.prompt_logprobs is not None:
                send(chunk)

    def _params(self, sampling: Sampling) -> SamplingParams:
        """SAMPLING as vLLM's parameters, checked as vLLM checks them before any adapter is loaded for them; a JSON
        schema it cannot use is named as the response_format's fault."""
        config = self._llm.vllm_config
        checks = [(replace(sampling, json_schema=None), None)]
        if sampling.json_schema is not None:
            checks.append((sampling, "response_format"))
        for settings, param in checks:
            try:
                params = _sampling_params(settings)
                outputs_config, tokenizer = config.structured_outputs_config, self._llm.tokenizer
                params.verify(config.model_config, config.speculative_config, outputs_config, tokenizer)
            except (ValueError, VLLMClientError) as exc:
                raise InvalidRequest(str(exc), param=param) from None
        return params

    async def _abort(self, request_id: str) -> None:
        record = self._requests.get(request_id)
        if record is not None:
            await _stop(record)

    # Adapters, on the engine's loop: an LRU of those registered in vLLM; those in use are never evicted.

    async def _use(self, spec: AdapterSpec, hold: bool) -> tuple[_Adapter, bool]:
        """SPEC's registered adapter (most recently used now) and whether it was loaded now; HOLD counts a user."""
        key = spec.key
        while True:
            entry = self._loaded.get(key)
            if entry is not None:
                self._loaded.move_to_end(key)
                entry.users += hold
                return entry, False
            async with self._changing:
                if key in self._loaded:  # another call loaded it while this one waited
                    continue
                if not (spec.path / WEIGHTS).is_file():  # vLLM would fall back to unpickling a .bin
                    raise AdapterLoadFailed(key, f"no {WEIGHTS}; the server loads safetensors weights only.")
                await self._make_room()
                entry = await self._add(LoRARequest(key, self._lora_id(key), str(spec.path)))
                entry.users += hold
                return entry, True

    async def _add(self, lora: LoRARequest) -> _Adapter:
        """Register LORA in vLLM and in the table; a caller that leaves meanwhile still gets the table right, so
        that vLLM never holds an adapter the table lacks (the spare slot depends on it)."""
        call = asyncio.ensure_future(self._llm.add_lora(lora))
        try:
            added = await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.wait([call])
            if not call.cancelled() and call.exception() is None and call.result():
                self._register(lora)
            raise
        except EngineDeadError:
            raise
        except Exception as exc:
            raise AdapterLoadFailed(lora.lora_name, _worker_error(exc)) from None
        if not added:
            raise AdapterLoadFailed(lora.lora_name, "vLLM did not add it")
        return self._register(lora)

    def _register(self, lora: LoRARequest) -> _Adapter:
        entry = _Adapter(lora)
        with self._lock:
            self._loaded[lora.lora_name] = entry
            self._loads += 1
        return entry

    def lora_id(self, key: str) -> int | None:
        """The LoRA id vLLM knows adapter version KEY by (None before its first load)."""
        return self._ids.get(key)

    def _lora_id(self, key: str) -> int:
        """KEY's LoRA id: the same for the engine's life, never one another version had."""
        if key not in self._ids:
            self._ids[key] = len(self._ids) + 1
        return self._ids[key]

    async def _preload(self, spec: AdapterSpec) -> bool:
        """`load`: when every place holds an adapter in use, SPEC waits for a place without blocking the caller (the
        first request for it loads it), as the transformers engine's pending adapters do; `loaded` omits it."""
        busy = all(entry.users for entry in self._loaded.values())
        if spec.key not in self._loaded and len(self._loaded) >= self.max_loaded and busy:
            return True
        return (await self._use(spec, hold=False))[1]

    async def _make_room(self) -> None:
        """Evict the least recently used idle adapter while all places are taken, waiting for one to go idle."""
        while len(self._loaded) >= self.max_loaded:
            idle = next((key for key, entry in self._loaded.items() if entry.users == 0), None)
            if idle is None:
                async with self._freed:
                    await self._freed.wait()
                continue
            await self._llm.remove_lora(self._loaded[idle].lora.lora_int_id)
            with self._lock:
                del self._loaded[idle]
                self._evictions += 1

    async def _release(self, key: str) -> None:
        entry = self._loaded.get(key)
        if entry is not None:
            entry.users -= 1
        async with self._freed:
            self._freed.notify_all()

    async def _unload(self, key: str) -> bool:
        async with self._changing:
            entry = self._loaded.get(key)
            if entry is None or entry.users:
                return False
            await self._llm.remove_lora(entry.lora.lora_int_id)
            with self._lock:
                del self._loaded[key]
            return True


class _Turns:
    """When a generation may enter vLLM: one whose prompt is scored (prompt log-probabilities) enters only an empty
    batch and holds it alone until its prompt has run; the others wait behind it meanwhile.

    With LoRA enabled, vLLM (0.32) scores prompt tokens through LoRA's logits path with one adapter index per request
    of the step, not one per prompt token: a scored prompt sharing a step with any other request, with or without an
    adapter, fails in its engine core (`einsum(): subscript b has size 2 ... 399`) and that kills the engine.
    """

    def __init__(self) -> None:
        self.inside = 0  # generations in vLLM
        self.alone: str | None = None  # the generation whose prompt is being scored alone
        self.queued = 0  # prompts waiting to be scored alone: generations arriving meanwhile wait behind them
        self._changed = asyncio.Event()

    async def enter(self, request: GenerateRequest) -> None:
        """Wait for REQUEST's turn to enter vLLM's batch."""
        scoring = request.sampling.prompt_logprobs is not None
        self.queued += scoring
        try:
            if scoring:
                await self._until(lambda: self.alone is None and not self.inside)
                self.alone = request.request_id
            else:
                await self._until(lambda: self.alone is None and not self.queued)
        finally:
            self.queued -= scoring
            self._change()
        self.inside += 1

    def scored(self, request_id: str) -> None:
        """REQUEST_ID's prompt has run: others may join the batch."""
        if self.alone == request_id:
            self.alone = None
            self._change()

    def leave(self, request_id: str) -> None:
        """REQUEST_ID has left vLLM."""
        self.inside -= 1
        self.scored(request_id)
        self._change()

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self._changed.wait()

    def _change(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


async def _stop(record: _Request) -> None:
    """Cancel a generation's task and wait until it has ended (vLLM's `generate` aborts its request when cancelled)."""
    record.task.cancel()
    await asyncio.wait([record.task])


class _NoPrometheus(PrometheusStatLogger):
    """Stands in for vLLM's Prometheus metrics, which would register in this process's registry beside the
    server's own (it reports the queue and adapters under vLLM's names itself, from the engine's status)."""

    def __init__(self, vllm_config: Any, engine_indexes: Any = None) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_admission_rejection(self, reason: str) -> None:
        pass

    def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass


class _StepStats(StatLoggerBase):
    """Hands the engine vLLM's per-step scheduler report (rows of the pass, KV cache use)."""

    def __init__(self, step: Callable[[Any], None]) -> None:
        self._step = step

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
        self._step(scheduler_stats)

    def log_engine_initialized(self) -> None:
        pass


def _sampling_params(sampling: Sampling) -> SamplingParams:
    """SAMPLING as vLLM's parameters, with outputs as deltas."""
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop=list(sampling.stop) or None,
        seed=sampling.seed,
        ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs,
        prompt_logprobs=sampling.prompt_logprobs,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        logit_bias=dict(sampling.logit_bias) or None,
        stop_token_ids=list(sampling.stop_token_ids) or None,
        structured_outputs=StructuredOutputsParams(json=sampling.json_schema) if sampling.json_schema else None,
        output_kind=RequestOutputKind.DELTA,
    )


def _chunk(output: Any, request: GenerateRequest, first: bool) -> Chunk | None:
    """One of vLLM's delta outputs as a chunk; None when vLLM ended it by an abort."""
    completion = output.outputs[0]
    reason = completion.finish_reason
    if reason == "abort":
        return None
    if reason not in (None, "stop", "length"):
        raise GenerationFailed(f"vLLM ended this request with {reason!r}.")
    sampling = request.sampling
    scored: tuple[TokenLogprob, ...] = ()
    if sampling.logprobs is not None:
        scored = tuple(_scored(t, e, sampling.logprobs) for t, e in zip(completion.token_ids, completion.logprobs))
    prompt = None
    if first and sampling.prompt_logprobs is not None:
        entries = list(output.prompt_logprobs or [])[1:]  # the first prompt token has none
        prompt = tuple(_scored(t, e, sampling.prompt_logprobs) for t, e in zip(request.prompt_ids[1:], entries))
    return Chunk(completion.text, tuple(completion.token_ids), reason, scored, prompt)


def _scored(token: int, entry: dict[int, Any], top: int) -> TokenLogprob:
    """TOKEN's log-probability from vLLM's entry at its place, with the TOP most likely tokens there."""
    best = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top)
    return TokenLogprob(token, float(entry[token].logprob), tuple((t, float(lp)) for _, t, lp in best))


def _worker_error(exc: Exception) -> str:
    """The reason inside vLLM's 'Call to add_lora method failed: Worker failed with error ...' message."""
    found = re.search(r"failed with error '(.*)', please check", str(exc), re.DOTALL)
    return found.group(1) if found else str(exc)


def _positions(base_path: Path, default: int) -> int:
    """The positions the base model was trained for (its max_position_embeddings), DEFAULT when it says none."""
    return int(getattr(AutoConfig.from_pretrained(base_path).get_text_config(), "max_position_embeddings", default))


def _kv_cache_bytes(kv_cache_gb: float | None, on_cpu: bool) -> int | None:
    """The KV cache size to ask vLLM for: KV_CACHE_GB, else on CPU 1 GiB unless VLLM_CPU_KVCACHE_SPACE says."""
    if kv_cache_gb is not None:
        return int(kv_cache_gb * GiB)
    return GiB if on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE") else None
