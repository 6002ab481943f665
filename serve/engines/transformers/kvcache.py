"""Keys and values of the running requests, kept in blocks: one cache row per request, rows 0..n-1 always the running
ones."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapterctl.core.memory import trim
from adapterctl.serve.engines.transformers import attention


BLOCK = 16  # tokens per block: a row wastes fewer than this many tokens' storage
MIN_BLOCKS = 4  # the smallest pool kept while any row holds tokens


@dataclass
class _Group:
    """Segments of a pass whose attention runs as one padded batch through torch: their queries' places in the pass,
    the slots their keys are read from, and which key each query may see."""

    gather: torch.Tensor  # (segments, width): the pass position of each padded query place (padding: position 0)
    real: torch.Tensor  # (segments, width): which places are real queries
    read: torch.Tensor  # (segments, keys): the token slot of each key, padded with the zero slot
    mask: torch.Tensor  # (segments, 1, width, keys): causal within each segment's row


@dataclass
class _Pass:
    """Where the next forward pass writes its keys and values, and how its attention reads each segment's row."""

    rows: list[int]
    starts: torch.Tensor  # each segment's first position in its row
    lengths: torch.Tensor  # each segment's tokens in this pass
    firsts: torch.Tensor  # each segment's first token's place in the pass
    write: torch.Tensor  # the token slot of each of the pass's tokens
    # Built on first use, once a pass: the single-token segments' places, block tables and lengths for the kernel;
    # the padded batches torch attends for (all segments, or those of more than one token).
    singles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    groups: dict[bool, _Group] = field(default_factory=dict)


class BlockCache:
    """Keys and values in blocks of BLOCK tokens from one pool per layer; a row holds the blocks its tokens fill.

    Before each forward pass the engine says what it holds (`pack`): segments of rows' tokens one after the other in one
    sequence, each from its row's own position on (a running row's next token, a part of a prompt: a long prompt comes
    in chunks), so no pass computes padding. The model's attention layers write through `update` and read through
    `attend`. Storage follows the tokens the rows hold, not rows x the longest: the pool grows by doubling as rows take
    blocks, and is compacted when three quarters of it lie free, so one long request's peak is not kept. It never grows
    past CAPACITY blocks: the engine admits no request whose blocks would not fit.
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

    def pack(self, rows: list[int], starts: list[int], lengths: list[int]) -> None:
        """The next forward pass holds, one after the other in one sequence, LENGTHS[i] tokens for row ROWS[i] from its
        position STARTS[i] on (0: the row starts afresh): a running row's next token, or a part of a prompt."""
        ends = [start + length for start, length in zip(starts, lengths, strict=True)]
        for row, start, end in zip(rows, starts, ends, strict=True):
            if start == 0:
                self._release(row)
            self._extend(row, end)
        lengths_t, starts_t = torch.tensor(lengths), torch.tensor(starts)
        segment = torch.repeat_interleave(torch.arange(len(rows)), lengths_t)  # each token's segment
        firsts = torch.cumsum(lengths_t, 0) - lengths_t
        position = starts_t[segment] + torch.arange(len(segment)) - firsts[segment]
        slots = self._slots(self._tables(rows), torch.tensor(ends))
        self._pass = _Pass(rows, starts_t, lengths_t, firsts, write=slots[segment, position])

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
        """Store this pass's keys and values (1, key/value heads, tokens, dim) for LAYER; they go on to `attend`."""
        if layer == len(self.keys):
            shape = (self.blocks * BLOCK + 1, key.shape[1], key.shape[3])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        step = self._pass
        assert step is not None
        for pool, new in ((self.keys[layer], key), (self.values[layer], value)):
            pool[step.write] = new[0].transpose(0, 1)
        return key, value

    def attend(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        mask: torch.Tensor | None, scaling: float | None,
    ) -> torch.Tensor:  # fmt: skip
        """This pass's attention output for MODULE's layer, (1, tokens, heads, head dim): each segment attends to its
        own row's tokens up to each of its own. Single-token segments (running rows' next tokens) go through the
        compiled kernel where it fits; the other segments, padded to the longest, through torch's attention."""
        step, layer = self._pass, module.layer_idx
        assert step is not None
        keys, values = self.keys[layer], self.values[layer]
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        queries = query[0].transpose(0, 1)  # (tokens, heads, dim)
        out = torch.empty_like(queries)
        single = step.lengths == 1
        kernel = bool(single.any()) and attention.fits(query, keys)
        if kernel:
            if step.singles is None:  # built once a pass
                places = step.firsts[single]
                tables = self._tables([row for row, one in zip(step.rows, single.tolist(), strict=True) if one])
                step.singles = (places, tables, step.starts[single] + 1)
            places, tables, lengths = step.singles
            out[places] = attention.decode(queries[places, :, None], keys, values, tables, lengths, BLOCK, scale)[:, 0]
        if not kernel or not bool(single.all()):
            group = self._group(step, not kernel)
            padded = queries[group.gather].transpose(1, 2)  # (segments, heads, width, dim)
            read_keys, read_values = keys[group.read].transpose(1, 2), values[group.read].transpose(1, 2)
            attended = attention.sdpa(module, padded, read_keys, read_values, group.mask, scale)
            out[group.gather[group.real]] = attended[group.real]
        return out[None]

    def _group(self, step: _Pass, everyone: bool) -> _Group:
        """The padded batch of STEP's segments torch attends for (EVERYONE: all of them, else those of more than one
        token), built once a pass."""
        if everyone not in step.groups:
            chosen = torch.ones_like(step.lengths, dtype=torch.bool) if everyone else step.lengths > 1
            lengths, starts = step.lengths[chosen], step.starts[chosen]
            firsts = step.firsts[chosen]
            width = int(lengths.max())
            places = torch.arange(width)
            real = places < lengths[:, None]
            gather = torch.where(real, firsts[:, None] + places, 0)
            ends = starts + lengths
            rows = [row for row, kept in zip(step.rows, chosen.tolist(), strict=True) if kept]
            read = self._slots(self._tables(rows), ends)
            keys = torch.arange(read.shape[1])
            # A padding place sees its row's keys too (none of them would give NaN), its output is dropped.
            mask = (keys[None, None, :] <= (starts[:, None] + places)[:, :, None]) & (keys < ends[:, None])[:, None]
            step.groups[everyone] = _Group(gather, real, read, mask[:, None])
        return step.groups[everyone]

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
