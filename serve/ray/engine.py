"""The engine contract over Ray Serve: requests routed by their exact adapter version to engine replicas.

The HTTP layer above sees one engine; each call goes through a `DeploymentHandle` with the version's key as
Ray Serve's multiplexed model id, so a version's requests land on the replicas that hold it. A replica lost
before it sent anything is tried once more; one lost mid-stream is the engine-neutral EngineUnavailable (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import fields
from itertools import chain
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError, TaskCancelledError
from ray.serve.exceptions import RayServeException
from transformers import AutoTokenizer

from adapterctl.core.errors import first_line
from adapterctl.serve.engines.base import AdapterSpec, Chunk, Engine, EngineStatus, GenerateRequest
from adapterctl.serve.engines.tokenizer import HFTokenizer
from adapterctl.serve.api.metrics import REPLICA_RETRIES, REPLICA_ROUTES
from adapterctl.serve.ray.replica import STATUS_SECONDS, EngineDescription, Failed, Routed, unavailable

log = logging.getLogger("serve")
_LOST = (RayError, RayServeException)  # a replica died, restarts or cannot be reached (cancellation aside)


class RayEngine(HFTokenizer, Engine):
    """Engine replicas behind a Ray Serve handle; tokenizing happens here, on the ingress, with the base's tokenizer."""

    name = "ray"

    def __init__(
        self,
        handle: Any,
        board: Any,
        base_path: Path,
        description: EngineDescription,
        replicas: int,
        affinity: bool = True,
    ) -> None:
        for item in fields(description):
            setattr(self, item.name, getattr(description, item.name))
        # Every replica's batch: what tenants' fair share (`serve.engines.fairness`) lets in at once, over all of them.
        self.max_batch = description.max_batch and description.max_batch * replicas
        self.max_batched_tokens = description.max_batched_tokens and description.max_batched_tokens * replicas
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        self._handle = handle
        self._board = board
        self._affinity = affinity  # False: Ray Serve routes without the version (to compare, as bench/replicas.py)
        self._streams: dict[str, Any] = {}  # request id -> its response stream, to cancel on abort
        self._replicas: dict[str, tuple[int, EngineStatus]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="replica-statuses", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        """Read the replicas' statuses from the board a few times a second (status() must be cheap)."""
        while True:
            with contextlib.suppress(Exception):  # the board unreachable a moment: keep the last statuses read
                self._replicas = ray.get(self._board.read.remote(), timeout=10)
            if self._stop.wait(STATUS_SECONDS):
                return

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.check(request)
        key = request.adapter.key if request.adapter else ""
        for attempt in range(2):
            stream = self._handle.options(multiplexed_model_id=self._route(key), stream=True).generate.remote(request)
            self._streams[request.request_id] = stream
            produced = ended = False
            try:
                async for item in stream:
                    if isinstance(item, Routed):
                        REPLICA_ROUTES.labels(item.replica, _result(item, key)).inc()
                    elif isinstance(item, Failed):
                        raise item.error()
                    else:
                        produced = True
                        yield item
                ended = True
                return
            except TaskCancelledError:  # abort: the iteration ends without a finish reason
                return
            except _LOST as exc:
                if produced or attempt:
                    log.warning("request_id=%s lost its replica: %s", request.request_id, first_line(exc))
                    raise unavailable(exc) from None
                log.warning("request_id=%s lost its replica before it answered; sending it again.", request.request_id)
                REPLICA_RETRIES.inc()
            finally:
                self._streams.pop(request.request_id, None)
                if not ended:  # the caller left early, or it failed: the replica frees the generation's row
                    stream.cancel()

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.cancel()

    async def load(self, adapter: AdapterSpec) -> bool:
        for attempt in range(2):
            try:
                result = await self._handle.options(multiplexed_model_id=self._route(adapter.key)).load.remote(adapter)
                break
            except _LOST as exc:
                if attempt:
                    raise unavailable(exc) from None
                log.warning("Loading %s lost its replica before it answered; sending it again.", adapter.key)
                REPLICA_RETRIES.inc()
        if isinstance(result, Failed):
            raise result.error()
        REPLICA_ROUTES.labels(result.replica, _result(result, adapter.key)).inc()
        if result.cold and self._affinity:
            await self._until_routed(adapter.key)
        return result.cold

    def _route(self, key: str) -> str:
        """The multiplexed model id a call for adapter version KEY is routed by ("" routes it anywhere)."""
        return key if self._affinity else ""

    async def _until_routed(self, key: str) -> None:
        """Wait (2 s at most) until this process's Ray Serve router routes KEY to the replicas that hold it.

        A replica announces a version it loads through Serve's controller, a moment after the load; a request
        routed before that goes to the replica with the fewest versions and loads it a second time there.
        """
        for _ in range(100):
            if self._routed(key):
                return
            await asyncio.sleep(0.02)

    def _routed(self, key: str) -> bool:
        """Whether the router knows a replica holding KEY (Ray Serve 2.60's router table; True where it has none)."""
        try:
            router = self._handle._router._asyncio_router.request_router
            return bool(router._multiplexed_model_id_to_replica_ids.get(key))
        except AttributeError:
            return True

    async def unload(self, key: str) -> bool:
        try:
            return await self._handle.options(multiplexed_model_id=key).unload.remote(key)
        except _LOST as exc:
            raise unavailable(exc) from None

    async def loaded(self) -> list[str]:
        """Keys of the adapters loaded on any replica, read from the board now (the status may be 0.2 s old)."""
        self._replicas = await self._board.read.remote()
        return list(self.status().loaded)

    def status(self) -> EngineStatus:
        """The replicas' statuses added up, each one's own under `replicas`."""
        statuses = {replica: status for replica, (_, status) in self._replicas.items()}
        each = list(statuses.values())
        passes: dict[int, int] = {}
        for status in each:
            for rows, count in status.passes.items():
                passes[rows] = passes.get(rows, 0) + count
        return EngineStatus(
            running=sum(s.running for s in each),
            waiting=sum(s.waiting for s in each),
            running_adapters=tuple(sorted(set(chain.from_iterable(s.running_adapters for s in each)))),
            waiting_adapters=tuple(sorted(set(chain.from_iterable(s.waiting_adapters for s in each)))),
            loaded=tuple(dict.fromkeys(chain.from_iterable(s.loaded for s in each))),
            max_loaded=sum(s.max_loaded for s in each) or self.max_loaded,
            loads=sum(s.loads for s in each),
            evictions=sum(s.evictions for s in each),
            passes=passes,
            replicas=statuses,
        )

    async def close(self) -> None:
        self._stop.set()


def _result(routed: Routed, key: str) -> str:
    """How a request found its adapter on the replica it was routed to: already there, loaded for it, or none."""
    if not key:
        return "base"
    return "cold" if routed.cold else "hit"
