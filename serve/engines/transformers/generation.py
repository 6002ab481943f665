"""One request inside the transformers engine, and how the worker hands its chunks to the request's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from adapterctl.serve.engines.base import AdapterSpec, GenerateRequest, Item, Sampling, TokenLogprob
from adapterctl.serve.engines.transformers.slots import Adapter

UNREAD = 8  # chunks a generation may have waiting for its reader; past that its row pauses (a bounded queue)


@dataclass(eq=False)
class Generation:
    """One request inside the engine: its chunks go to the event loop that asked for it."""

    request: GenerateRequest
    completion_tokens: int = 0
    cancelled: bool = False  # finished, failed or aborted: the worker drops its row at the next step
    pinned: Adapter | None = None  # its adapter, pinned from admission until it leaves the batch
    prompt_logprobs: list[TokenLogprob] | None = None  # scored at prefill, sent with the first chunk
    started: bool = False  # its first chunk is sent
    overtaken: int = (
        0  # younger generations admitted while it waited for blocks (`serve.engines.transformers.admission`)
    )
    sent: int = 0  # chunks the worker handed over (written by the worker only)
    taken: int = 0  # chunks its reader took (written by the reader only)
    resumed: Callable[[], None] = field(default=lambda: None, repr=False)  # its reader caught up: wake the worker
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop, repr=False)
    queue: asyncio.Queue[Item] = field(default_factory=asyncio.Queue, repr=False)

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.request.prompt_ids

    @property
    def adapter(self) -> AdapterSpec | None:
        return self.request.adapter

    @property
    def sampling(self) -> Sampling:
        return self.request.sampling

    @property
    def behind(self) -> bool:
        """Whether its reader left UNREAD chunks waiting: its row pauses until the reader takes some."""
        return self.sent - self.taken >= UNREAD and not self.cancelled

    def take(self) -> None:
        """Its reader took a chunk: when that ends a pause, the worker is woken to run its row again."""
        self.taken += 1
        if self.sent - self.taken == UNREAD - 1:
            self.resumed()

    def publish(self, item: Item) -> None:
        """Hand a chunk (or the error that ended the generation) to the request's event loop; any thread."""
        deliver([(self, item)])


def deliver(items: list[tuple[Generation, Item]]) -> None:
    """Hand many generations their chunks with one wake-up of each event loop (a batch step's worth at once)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, Item]]] = {}
    for generation, item in items:
        by_loop.setdefault(generation.loop, []).append((generation, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # that event loop is closed: nobody reads these generations any more
            for generation, _ in batch:
                generation.cancelled = True


def _put_all(batch: list[tuple[Generation, Item]]) -> None:
    for generation, item in batch:
        generation.queue.put_nowait(item)
