"""Which waiting generations join the running batch at a step of the transformers engine."""

from __future__ import annotations

from collections import deque

from serve.generation import Generation
from serve.slots import IN_SLOT, Adapter, Slots, State


class Admission:
    """Oldest first, while the batch has rows free, each one whose adapter is in a slot or has a slot to go to.

    Admitting a generation pins its adapter at once, so the slots promised to new adapters are never taken by
    others, and an adapter in use is never evicted. The slots allow an adapter per batch row, so the adapters a
    batch touches never hold it to fewer rows; a generation whose adapter has no slot waits for a row to end.
    """

    def __init__(self, slots: Slots, max_batch: int) -> None:
        self.slots = slots
        self.max_batch = max_batch

    def admit(self, waiting: deque[Generation], running: int) -> tuple[list[Generation], list[Adapter]]:
        """Take generations off WAITING for a batch of RUNNING rows; returns them and the adapters to install first."""
        admitted: list[Generation] = []
        new: list[Adapter] = []
        for generation in list(waiting):
            if len(admitted) >= self.max_batch - running:
                break
            if generation.cancelled:
                waiting.remove(generation)
            elif self._pin(generation, new):
                waiting.remove(generation)
                admitted.append(generation)
        self._drop_unwanted(waiting)
        return admitted, new

    def _pin(self, generation: Generation, new: list[Adapter]) -> bool:
        """Pin GENERATION's adapter, noting it in NEW when it must be installed; False when it has no slot to go to."""
        if generation.adapter is None:
            return True
        adapter = self.slots.pin(generation.adapter)
        if adapter is None:
            return False
        if adapter.state not in IN_SLOT and adapter not in new:
            new.append(adapter)
        generation.pinned = adapter
        return True

    def _drop_unwanted(self, waiting: deque[Generation]) -> None:
        """Bound the read adapters kept for requests that went away before a slot was free."""
        if len(self.slots.in_state(State.PENDING)) > self.max_batch:
            self.slots.drop({g.adapter.key for g in waiting if g.adapter})
