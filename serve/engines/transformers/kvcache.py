"""Keys and values of the running requests, kept in blocks: one cache row per request, rows 0..n-1 always the running
ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterctl.core.memory import trim
from adapterctl.serve.engines.transformers import attention


BLOCK = 16  # tokens per block: a row wastes fewer than this many tokens' storage
MIN_BLOCKS = 4  # the smallest pool kept while any row holds tokens


@dataclass
class _Pass:
    """Where the next forward pass writes its keys and values, and what its attention reads."""

    write: torch.Tensor  # the token slots this pass's tokens go to, in row-major order of the real ones
    real: torch.Tensor | None  # (rows, tokens): which of the pass's positions are real tokens (None: all)
    read: torch.Tensor | None = None  # (rows, tokens): the slots attention reads, padded with the zero slot
    tables: torch.Tensor | None = None  # decode: (rows, blocks) each row's blocks, for the kernel
    lengths: torch.Tensor | None = None  # decode: each row's tokens, this one included


class BlockCache:
    """Keys and values in blocks of BLOCK tokens from one pool per layer; a row holds the blocks its tokens fill.

    Before each forward pass the engine says what it holds: `prefill(rows, lengths, starts)` for prompt tokens written
    to each row from its own start on (a long prompt comes in chunks), or `decode(positions)` for one new token per
    running row at its own position. The model's attention layers write through `update` and read through
    `attend`. Storage follows the tokens the rows hold, not rows x the longest: the pool grows by doubling as rows
    take blocks, and is compacted when three quarters of it lie free, so one long request's peak is not kept. It never
    grows past CAPACITY blocks: the engine admits no request whose blocks would not fit.
    """

    def __init__(self, rows: int, capacity: int) -> None:
        self.capacity = capacity
        self.tables: list[list[int]] = [[] for _ in range(rows)]  # row -> its blocks, in token order
        self.free: list[int] = []  # blocks no row holds
        self.blocks = 0  # blocks each pool has room for
        # Per layer: (blocks * BLOCK + 1 token slots, key/value heads, head dim). The last slot stays zero: padding
        # reads it, since a row's positions past its tokens are masked but 0 * NaN is NaN, and a freed block may hold
        # NaNs.
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._pass: _Pass | None = None

    def held(self) -> int:
        """Blocks the rows hold."""
        return self.blocks - len(self.free)

    def nbytes(self) -> int:
        """Memory the stored keys and values take."""
        return sum(tensor.nbytes for store in (self.keys, self.values) for tensor in store)

    def prefill(self, rows: list[int], lengths: list[int], starts: list[int]) -> None:
        """The next forward pass writes LENGTHS[i] tokens of a prompt into row ROWS[i], from position STARTS[i] on
        (0: the row starts afresh); a later chunk's attention reads the row's earlier tokens too."""
        ends = [start + length for start, length in zip(starts, lengths, strict=True)]
        for row, start, end in zip(rows, starts, ends, strict=True):
            if start == 0:
                self._release(row)
            self._extend(row, end)
        slots = self._slots(self._tables(rows), torch.tensor(ends))
        width = max(lengths)
        real = torch.arange(width) < torch.tensor(lengths)[:, None]
        positions = (torch.tensor(starts)[:, None] + torch.arange(width)).clamp(max=slots.shape[1] - 1)
        self._pass = _Pass(
            write=slots.gather(1, positions)[real],
            real=None if bool(real.all()) else real,
            read=slots if any(starts) else None,
        )

    def decode(self, positions: torch.Tensor) -> None:
        """The next forward pass adds one token per running row, row i at POSITIONS[i]."""
        rows = range(len(positions))
        for row, position in zip(rows, positions.tolist(), strict=True):
            self._extend(row, position + 1)
        lengths = positions + 1
        tables = self._tables(rows)
        write = tables[torch.arange(len(rows)), positions // BLOCK] * BLOCK + positions % BLOCK
        self._pass = _Pass(write=write, real=None, tables=tables, lengths=lengths)

    def keep(self, order: list[int]) -> None:
        """Rows 0, 1, ... hold the tokens rows ORDER[0], ORDER[1], ... held; every other row's blocks are freed."""
        kept = set(order)
        for row in range(len(self.tables)):
            if row not in kept:
                self._release(row)
        tables = [self.tables[row] for row in order]
        self.tables = tables + [[] for _ in range(len(self.tables) - len(tables))]

    def shrink(self, rows: int) -> None:
        """Free the blocks of rows from ROWS on; compact the pools when that leaves three quarters or more free.

        Without rows it frees everything. The threshold keeps rows coming and going from copying the cache each step.
        """
        for row in range(rows, len(self.tables)):
            self._release(row)
        held = self.held()
        if held == 0:
            if self.keys or self.blocks:
                self.keys, self.values, self.free, self.blocks = [], [], [], 0
                trim()
        elif 4 * held <= self.blocks and self.blocks > MIN_BLOCKS:
            self._compact(max(MIN_BLOCKS, _power_of_two(held)))
            trim()

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer: int, *args: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's keys and values for LAYER; they go on to `attend` as they are."""
        if layer == len(self.keys):
            shape = (self.blocks * BLOCK + 1, key.shape[1], key.shape[3])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        step = self._pass
        assert step is not None
        for pool, new in ((self.keys[layer], key), (self.values[layer], value)):
            tokens = new.transpose(1, 2)  # (rows, tokens, heads, dim)
            pool[step.write] = tokens[step.real] if step.real is not None else tokens.reshape(-1, *tokens.shape[2:])
        return key, value

    def attend(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        mask: torch.Tensor | None, scaling: float | None,
    ) -> torch.Tensor:  # fmt: skip
        """This pass's attention output for MODULE's layer, (rows, tokens, heads, head dim)."""
        step, layer = self._pass, module.layer_idx
        assert step is not None
        keys, values = self.keys[layer], self.values[layer]
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        if step.tables is not None:  # a decode pass
            assert step.lengths is not None
            if attention.fits(query, keys):
                return attention.decode(query, keys, values, step.tables, step.lengths, BLOCK, scale)
            if step.read is None:  # no kernel: the rows' tokens gathered, padded (once for every layer)
                step.read = self._slots(step.tables, step.lengths)
        if step.read is not None:
            key, value = keys[step.read].transpose(1, 2), values[step.read].transpose(1, 2)
        return attention.sdpa(module, query, key, value, mask, scale)

    def _extend(self, row: int, length: int) -> None:
        """Give ROW blocks for LENGTH tokens, growing the pools when no block is free."""
        table = self.tables[row]
        while len(table) * BLOCK < length:
            if not self.free:
                if self.blocks >= self.capacity:  # a bug: the admission reserved every row's blocks
                    raise RuntimeError(f"the block cache is full ({self.capacity} blocks)")
                self._grow(min(self.capacity, max(MIN_BLOCKS, 2 * self.blocks)))
            table.append(self.free.pop())

    def _release(self, row: int) -> None:
        """ROW's blocks go back to the free list."""
        self.free.extend(self.tables[row])
        self.tables[row] = []

    def _tables(self, rows: range | list[int]) -> torch.Tensor:
        """(rows, blocks): each row's blocks, padded with block 0."""
        width = max(len(self.tables[row]) for row in rows)
        return torch.tensor([self.tables[row] + [0] * (width - len(self.tables[row])) for row in rows])

    def _slots(self, tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(rows, longest): the token slot of each row's every position through its blocks in TABLES, past its
        LENGTHS[i] the zero slot."""
        positions = torch.arange(int(lengths.max()))
        slots = tables[:, positions // BLOCK] * BLOCK + positions % BLOCK
        return torch.where(positions < lengths[:, None], slots, self.blocks * BLOCK)

    def _grow(self, blocks: int) -> None:
        """Room for BLOCKS blocks; the held ones keep their ids."""
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                grown = old.new_zeros((blocks * BLOCK + 1, *old.shape[1:]))
                grown[: self.blocks * BLOCK] = old[:-1]
                store[layer] = grown
        self.free.extend(range(blocks - 1, self.blocks - 1, -1))  # lowest ids first off the free list
        self.blocks = blocks
        trim()  # the smaller pools just freed cannot hold the larger ones to come: back to the system

    def _compact(self, blocks: int) -> None:
        """Room for BLOCKS blocks, the held ones renumbered from 0 in the order of their ids."""
        held = sorted(block for table in self.tables for block in table)
        renumber = {block: new for new, block in enumerate(held)}
        source = (torch.tensor(held)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                compacted = old.new_zeros((blocks * BLOCK + 1, *old.shape[1:]))
                compacted[: len(held) * BLOCK] = old[source]
                store[layer] = compacted
        self.tables = [[renumber[block] for block in table] for table in self.tables]
        self.free = list(range(blocks - 1, len(held) - 1, -1))
        self.blocks = blocks


def blocks_for(tokens: int) -> int:
    """Blocks that hold TOKENS tokens."""
    return -(-tokens // BLOCK)


def _power_of_two(n: int) -> int:
    """The smallest power of two at least N (N >= 1)."""
    return 1 << (n - 1).bit_length()
