"""Which waiting generations join the running batch at a step of the transformers engine."""

from __future__ import annotations

from collections import deque

from adapterctl.serve.engines.base import GenerateRequest
from adapterctl.serve.engines.transformers.generation import Generation
from adapterctl.serve.engines.transformers.kvcache import blocks_for
from adapterctl.serve.engines.transformers.slots import IN_SLOT, Adapter, Slots, State

# How many younger generations may go first past one that waits for blocks: past it, nothing younger is admitted
# until it fits (running rows end within their max_tokens), so a long prompt is never starved by short ones.
OVERTAKES = 32
# The share of the blocks kept for short generations (each needing at most a RESERVE-th of that share): without it,
# long prompts fill the cache to the last block (48 of 1,771 tokens did on the embedded model) and a 3-token request
# waits for one of them to end.
RESERVE = 8


class Admission:
    """Oldest first, while the batch has rows free and the block cache room, each one whose adapter is in a slot or
    has a slot to go to.

    A generation holds the blocks of its whole prompt plus its max_tokens (within the context) from admission on,
    so running rows never run out of blocks. The last RESERVE-th of the blocks goes only to short generations. One
    that does not fit the blocks left waits; younger ones that fit (shorter prompts, fewer max_tokens) go first, up
    to OVERTAKES times past it.

    Admitting a generation pins its adapter at once, so the slots promised to new adapters are never taken by
    others, and an adapter in use is never evicted. The slots allow an adapter per batch row, so the adapters a
    batch touches never hold it to fewer rows; a generation whose adapter has no slot waits for a row to end.
    """

    def __init__(self, slots: Slots, max_batch: int, capacity: int, context_length: int) -> None:
        self.slots = slots
        self.max_batch = max_batch
        self.capacity = capacity  # blocks of the cache
        self.context_length = context_length
        self.reserve = capacity // RESERVE  # kept for short generations
        self.short = max(1, self.reserve // RESERVE)  # the most blocks a generation that may use the reserve needs
        self.largest = capacity - self.reserve  # the most blocks any generation may hold

    def blocks(self, request: GenerateRequest) -> int:
        """Blocks REQUEST holds while it runs: its prompt and every token it may generate."""
        tokens = len(request.prompt_ids) + request.sampling.max_tokens
        return blocks_for(min(tokens, self.context_length))

    def admit(self, waiting: deque[Generation], running: list[Generation]) -> tuple[list[Generation], list[Adapter]]:
        """Take generations off WAITING for a batch holding RUNNING; returns them and the adapters to install first."""
        admitted: list[Generation] = []
        new: list[Adapter] = []
        free = self.capacity - sum(self.blocks(g.request) for g in running)
        blocked: list[Generation] = []  # older ones left waiting for blocks, which those admitted now go past
        for generation in list(waiting):
            if len(admitted) >= self.max_batch - len(running):
                break
            if generation.cancelled:
                waiting.remove(generation)
                continue
            need = self.blocks(generation.request)
            if need > (free if need <= self.short else free - self.reserve):
                if generation.overtaken >= OVERTAKES:
                    break  # its turn: nothing younger goes first
                blocked.append(generation)
            elif self._pin(generation, new):
                waiting.remove(generation)
                admitted.append(generation)
                free -= need
                for older in blocked:
                    older.overtaken += 1
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
