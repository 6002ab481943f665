"""Tenants' fair share of the engine: the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language
Models" (OSDI 2024), kept above the engine so that every engine gets it.

Generations wait here, at most `capacity` of them (the engine's batch) in the engine at once, so that the order in
which they enter is decided here, not by the engine's first-in-first-out queue. Of those in the engine, the ones whose
prompt has not started (no first token yet) hold at most one step's prefill of prompt tokens (the engine's
`max_batched_tokens`), so a prompt let in here waits behind at most that much in the engine's queue (half a step
costs a tenant alone a third of its throughput on short prompts: bench/tenants.py); a tenant with none of its prompts
there puts one in beyond that, so its first token waits for no other tenant's queue. Each tenant has
a counter of the tokens served to it, divided by its weight; when a slot frees, the waiting tenant with the lowest
counter goes next.
A tenant that goes from idle to waiting has its counter lifted to the lowest of those waiting (or, with none
waiting, to that of the last tenant to stop waiting), so time spent idle is not banked. A tenant alone uses every
slot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from adapterctl.serve.engines.base import Chunk, Engine, GenerateRequest

# The paper's weights: a generated token costs a tenant twice what a prompt token does (a prompt token is one of many
# computed together in one pass, a generated token a pass of its own for its row).
PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0


@dataclass(eq=False)
class _Waiter:
    """One generation waiting for a slot: its prompt's tokens, charged when it is admitted."""

    tokens: int
    admitted: asyncio.Future[int]  # its priority in the engine, once admitted


@dataclass(eq=False)
class _Account:
    """A tenant's counter of served tokens (divided by its weight) and its generations waiting, oldest first."""

    weight: float = 1.0
    counter: float = 0.0
    waiting: deque[_Waiter] = field(default_factory=deque)
    unstarted: int = 0  # its generations in the engine whose prompt has not started


class FairShare:
    """Submits generations to an engine, at most CAPACITY at once (None: all at once), lowest counter first."""

    def __init__(self, engine: Engine, capacity: int | None) -> None:
        self.engine = engine
        self.capacity = capacity
        self.running = 0  # generations admitted to the engine and not yet ended
        self.unstarted_tokens = 0  # prompt tokens of those that have no first token yet
        self.window = engine.max_batched_tokens
        self._accounts: dict[str, _Account] = {}
        self._waiting = 0  # over every tenant
        self._last_left: _Account | None = None  # the last tenant whose queue emptied

    def waiting(self, tenant: str) -> int:
        """How many of TENANT's generations wait for a slot now."""
        account = self._accounts.get(tenant)
        return len(account.waiting) if account else 0

    def counter(self, tenant: str) -> float:
        """TENANT's served tokens so far (prompt x PROMPT_WEIGHT + generated x OUTPUT_WEIGHT), divided by its weight."""
        account = self._accounts.get(tenant)
        return account.counter if account else 0.0

    async def generate(self, tenant: str, weight: float, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """REQUEST's chunks from the engine once TENANT's turn comes; its slot frees when it ends, fails or is left."""
        if self.capacity is None:
            async for chunk in self.engine.generate(request):
                yield chunk
            return
        account = self._accounts.setdefault(tenant, _Account())
        account.weight = weight  # the tenants file may have changed it
        tokens = len(request.prompt_ids)
        request = replace(request, priority=await self._admit(account, tokens), tenant=tenant)
        held = unstarted = True
        try:
            async for chunk in self.engine.generate(request):
                account.counter += OUTPUT_WEIGHT * len(chunk.token_ids) / account.weight
                if unstarted:  # its prompt has run: the next prompt may enter
                    unstarted = False
                    self._started(account, tokens)
                if chunk.finish_reason is not None and held:  # its row is free now: no need to wait for the reader
                    held = False
                    self._free()
                yield chunk
        finally:
            if unstarted:
                self._started(account, tokens)
            if held:
                self._free()

    async def _admit(self, account: _Account, tokens: int) -> int:
        """Wait until ACCOUNT's generation of a TOKENS prompt may enter the engine; charged then. Its priority there."""
        assert self.capacity is not None
        if not account.waiting:
            self._lift(account)
        if self._room(account, tokens) and self._turn(account):
            return self._start(account, tokens)
        waiter = _Waiter(tokens, asyncio.get_running_loop().create_future())
        account.waiting.append(waiter)
        self._waiting += 1
        try:
            return await waiter.admitted
        except asyncio.CancelledError:
            if waiter.admitted.done() and not waiter.admitted.cancelled():
                self._started(account, tokens)  # admitted just as its client left: the slot goes to the next
                self._free()
            elif waiter in account.waiting:  # its client left while it waited: it never reaches the engine
                account.waiting.remove(waiter)
                self._waiting -= 1
                self._left(account)
                self._dispatch()
            raise

    def _lift(self, account: _Account) -> None:
        """An idle tenant starts waiting: its counter rises to the lowest waiting one, so idle time is not banked."""
        if self._waiting:
            floor = self._lowest_waiting()
        elif self._last_left is not None:
            floor = self._last_left.counter
        else:
            return
        account.counter = max(account.counter, floor)

    def _left(self, account: _Account) -> None:
        if not account.waiting:
            self._last_left = account

    def _turn(self, account: _Account) -> bool:
        """Whether ACCOUNT goes before every waiting tenant: nobody waits, or none has a lower counter."""
        return not self._waiting or account.counter <= self._lowest_waiting()

    def _lowest_waiting(self) -> float:
        """The lowest counter among the tenants that wait (some do)."""
        return min(a.counter for a in self._accounts.values() if a.waiting)

    def _room(self, account: _Account, tokens: int) -> bool:
        """Whether ACCOUNT's generation of a TOKENS prompt may enter the engine now: a free row, and room in the window
        (a prompt longer than the window enters alone). A tenant with no prompt in the engine yet puts one in beyond
        the window: its first token then waits for the pass running now and its own, not for the others' prompts."""
        assert self.capacity is not None
        if self.running >= self.capacity:
            return False
        if self.window is None or not self.unstarted_tokens or not account.unstarted and tokens <= self.window:
            return True
        return self.unstarted_tokens + tokens <= self.window

    def _start(self, account: _Account, tokens: int) -> int:
        """ACCOUNT's generation enters the engine; its priority there: how many of its prompts are there before it."""
        self.running += 1
        self.unstarted_tokens += tokens
        account.counter += PROMPT_WEIGHT * tokens / account.weight
        account.unstarted += 1
        return account.unstarted - 1

    def _started(self, account: _Account, tokens: int) -> None:
        self.unstarted_tokens -= tokens
        account.unstarted -= 1
        self._dispatch()

    def _free(self) -> None:
        self.running -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Let in, while there is room, the oldest waiting generation of the tenant with the lowest counter."""
        while self._waiting:
            account = min((a for a in self._accounts.values() if a.waiting), key=lambda a: a.counter)
            waiter = account.waiting[0]
            if not waiter.admitted.cancelled() and not self._room(account, waiter.tokens):
                return  # its turn holds: none overtakes it, or a long prompt would wait for ever
            account.waiting.popleft()
            self._waiting -= 1
            self._left(account)
            if waiter.admitted.cancelled():  # its client left; its task has not run since
                continue
            waiter.admitted.set_result(self._start(account, waiter.tokens))
