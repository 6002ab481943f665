"""The adapter slots of the LoRA layers: each adapter version's life as one state machine, the LRU, and pinning.

    (absent) -> READING -> PENDING -> LOADED <-> UNLOADING
                   |          |         |          |
                   v          v         v          v
                REJECTED    REJECTED   GONE       GONE
                            GONE

READING: asked for, its files being read; PENDING: read, waiting for a free slot; LOADED: installed in a slot, rows
may use it; UNLOADING: `unload` asked, dropped at the next sweep unless a generation uses it. REJECTED (cannot be
served) and GONE (evicted, unloaded or dropped) are final: the adapter leaves the table, and a later request
starts a new life. An adapter a generation uses (its users) is never evicted. The caller serialises every call.

Two bounds: KEEP adapters at most stay in slots when idle (the least recently used idle ones go beyond it), while
adapters pinned by generations may fill every one of CAPACITY slots, so that a batch is never held back by how
many adapters its rows use.
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from adapterctl.serve.engines.base import AdapterLoadFailed, AdapterSpec
from adapterctl.serve.engines.transformers.lora import AdapterWeights

log = logging.getLogger("serve")


class State(Enum):
    """Where an adapter version is in its life inside the engine."""

    READING = "reading"
    PENDING = "pending"
    LOADED = "loaded"
    UNLOADING = "unloading"
    REJECTED = "rejected"
    GONE = "gone"


_NEXT: dict[State, frozenset[State]] = {
    State.READING: frozenset({State.PENDING, State.REJECTED}),
    State.PENDING: frozenset({State.LOADED, State.REJECTED, State.GONE}),
    State.LOADED: frozenset({State.UNLOADING, State.GONE}),
    State.UNLOADING: frozenset({State.LOADED, State.GONE}),
    State.REJECTED: frozenset(),
    State.GONE: frozenset(),
}
IN_SLOT = (State.LOADED, State.UNLOADING)  # the states that hold a slot of the layers


class IllegalTransition(RuntimeError):
    """A move the adapter state machine does not allow: a bug in the engine, never a user's mistake."""


@dataclass(eq=False)
class Adapter:
    """One adapter version in the engine: its state and what that state holds."""

    spec: AdapterSpec
    state: State = State.READING
    weights: AdapterWeights | None = None  # PENDING: read, not installed yet
    slot: int | None = None  # LOADED, UNLOADING: the slot of the layers it occupies
    modules: tuple[str, ...] = ()  # the layers its slot changes
    users: int = 0  # generations admitted with it: pinned, never evicted while any remain
    settled: bool = False  # a `load` waiting for it may have its answer (a sweep has tried to install it)
    error: AdapterLoadFailed | None = None  # REJECTED: why

    @property
    def key(self) -> str:
        return self.spec.key

    def move(self, state: State) -> None:
        """Go to STATE; IllegalTransition if its life does not allow that move."""
        if state not in _NEXT[self.state]:
            raise IllegalTransition(f"adapter {self.key} cannot go from {self.state.value} to {state.value}")
        self.state = state


class Slots:
    """Every adapter version the engine knows, by key, in least recently used order; CAPACITY slots to install into,
    KEEP of them (default: all) for adapters no generation uses."""

    def __init__(
        self,
        capacity: int,
        install: Callable[[AdapterWeights, int], None],
        uninstall: Callable[[tuple[str, ...], int], None],
        keep: int | None = None,
    ) -> None:
        self.capacity = capacity
        self.keep = capacity if keep is None else min(keep, capacity)
        self._install = install
        self._uninstall = uninstall
        self._table: OrderedDict[str, Adapter] = OrderedDict()
        self._free = list(range(capacity))  # a heap: the lowest free slot first, as passes read slots up to the highest
        self.loads = 0  # installed since the start
        self.evictions = 0  # dropped to make room since the start
        self.sweeps = 0  # `unload` waits for the next one

    def get(self, key: str) -> Adapter | None:
        """The adapter KEY names, in whatever state (None: absent)."""
        return self._table.get(key)

    def in_state(self, *states: State) -> list[Adapter]:
        """The adapters in any of STATES, least recently used first."""
        return [adapter for adapter in self._table.values() if adapter.state in states]

    def loaded(self) -> tuple[str, ...]:
        """Keys of the adapters in a slot, least recently used first."""
        return tuple(adapter.key for adapter in self.in_state(*IN_SLOT))

    def busy(self) -> int:
        """Adapters pinned by generations: each holds a slot, or has been promised one."""
        return sum(1 for adapter in self._table.values() if adapter.users)

    def request(self, spec: AdapterSpec) -> Adapter:
        """SPEC's adapter: the known one, or a new one to read."""
        adapter = self._table.get(spec.key)
        if adapter is None:
            adapter = self._table[spec.key] = Adapter(spec)
        return adapter

    def touch(self, adapter: Adapter) -> None:
        """ADAPTER (in a slot) was used now: last to be evicted, and an unload asked for is called off."""
        if adapter.state is State.UNLOADING:
            adapter.move(State.LOADED)
        self._table.move_to_end(adapter.key)

    def pin(self, spec: AdapterSpec) -> Adapter | None:
        """SPEC's adapter for one more generation; None when it would need a slot of its own and none is free."""
        adapter = self._table.get(spec.key)
        if (adapter is None or not adapter.users) and self.busy() >= self.capacity:
            return None
        adapter = self.request(spec)
        if adapter.state in IN_SLOT:
            self.touch(adapter)
        adapter.users += 1
        return adapter

    def unpin(self, adapter: Adapter) -> None:
        """A generation using ADAPTER is done with it."""
        adapter.users -= 1

    def read(self, adapter: Adapter, weights: AdapterWeights) -> None:
        """ADAPTER's files are read: it waits for a slot."""
        adapter.move(State.PENDING)
        adapter.weights = weights

    def reject(self, adapter: Adapter, error: AdapterLoadFailed) -> None:
        """ADAPTER cannot be served: it leaves the table with ERROR for whoever waits on it."""
        adapter.move(State.REJECTED)
        adapter.weights, adapter.error, adapter.settled = None, error, True
        self._forget(adapter)

    def place(self, adapter: Adapter) -> bool:
        """Install a PENDING adapter, evicting the least recently used idle one if its bound is reached.

        A pinned adapter may take any free slot; one no generation uses only stays within KEEP. False when no idle
        adapter can make room. An install that fails leaves its slot clear and free, and raises.
        """
        if adapter.state is not State.PENDING or adapter.weights is None:
            raise IllegalTransition(f"adapter {adapter.key} cannot be installed from {adapter.state.value}")
        # At KEEP an idle adapter makes room even for a pinned one, so that memory stays at KEEP slots when it can.
        full = not self._free or self.capacity - len(self._free) >= self.keep
        if full and not self._evict_idle() and (not self._free or not adapter.users):
            return False
        slot = heapq.heappop(self._free)
        weights = adapter.weights
        try:
            self._install(weights, slot)
        except Exception:  # no pass may read half an adapter
            self._uninstall(tuple(weights.pairs), slot)
            heapq.heappush(self._free, slot)
            raise
        adapter.move(State.LOADED)
        adapter.slot, adapter.modules, adapter.weights, adapter.settled = slot, tuple(weights.pairs), None, True
        self._table.move_to_end(adapter.key)
        self.loads += 1
        return True

    def unload(self, key: str) -> Adapter | None:
        """Ask to drop KEY's adapter at the next sweep; None when it is not in a slot or a generation uses it."""
        adapter = self._table.get(key)
        if adapter is None or adapter.state not in IN_SLOT or adapter.users:
            return None
        if adapter.state is State.LOADED:
            adapter.move(State.UNLOADING)
        return adapter

    def sweep(self) -> None:
        """Apply what was asked: drop adapters to unload (unless in use again), install read ones while slots allow.

        One that fails to install is rejected; every read one is settled, installed or still waiting.
        """
        try:
            for adapter in self.in_state(State.UNLOADING):
                if adapter.users:
                    adapter.move(State.LOADED)  # a generation took it meanwhile: it stays
                else:
                    self._evict(adapter)
            self.trim()
            for adapter in self.in_state(State.PENDING):
                try:
                    if not self.place(adapter):
                        break  # every slot is pinned: the rest wait
                except Exception as exc:
                    log.exception("Installing adapter %s failed.", adapter.key)
                    self.reject(
                        adapter, AdapterLoadFailed(adapter.key, f"installing it failed ({type(exc).__name__}).")
                    )
            for adapter in self.in_state(State.PENDING):
                adapter.settled = True
        finally:
            self.sweeps += 1  # `unload` waits for this, so it counts even when a change failed

    def trim(self) -> None:
        """Evict idle adapters, least recently used first, until at most KEEP are in slots or none idle is left."""
        while self.capacity - len(self._free) > self.keep and self._evict_idle():
            pass

    def drop(self, wanted: set[str]) -> None:
        """Forget read adapters waiting for a slot that no generation pinned and no key in WANTED names."""
        for adapter in self.in_state(State.PENDING):
            if not adapter.users and adapter.key not in wanted:
                adapter.move(State.GONE)
                adapter.weights, adapter.settled = None, True
                self._forget(adapter)

    def _evict_idle(self) -> bool:
        """Evict the least recently used adapter in a slot that no generation uses; False when there is none."""
        idle = next((a for a in self.in_state(*IN_SLOT) if not a.users), None)
        if idle is None:
            return False
        self._evict(idle)
        self.evictions += 1
        return True

    def _evict(self, adapter: Adapter) -> None:
        assert adapter.slot is not None
        self._uninstall(adapter.modules, adapter.slot)
        heapq.heappush(self._free, adapter.slot)
        adapter.move(State.GONE)
        adapter.slot = None
        self._forget(adapter)

    def _forget(self, adapter: Adapter) -> None:
        if self._table.get(adapter.key) is adapter:
            del self._table[adapter.key]
