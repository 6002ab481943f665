"""Keys and values of the running requests: one cache row per request, rows 0..n-1 always the running ones."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import torch


class RowCache:
    """A per-layer key/value store that the model's attention layers update through `update`.

    Before each forward pass the engine says what it holds: `prefill(first_row, start)` for prompts written
    to rows first_row.. from position START on (a long prompt comes in chunks), or `decode(positions)` for one new
    token per running row at its own position.
    Storage grows by doubling (rows and tokens per row), so rows keep their place while requests of different
    lengths run side by side; `shrink` gives it back when requests leave, so one long request's peak is not kept.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows  # the most rows it ever holds: the engine's batch size
        self.height = 0  # rows the storage has room for now
        self.capacity = 0  # tokens per row the storage has room for now
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._first_row = 0
        self._start = 0
        self._positions: torch.Tensor | None = None

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ROWS rows of LENGTH tokens, keeping what is stored."""
        height = self.height if rows <= self.height else min(self.rows, _power_of_two(rows))
        capacity = self.capacity if length <= self.capacity else max(64, _power_of_two(length))
        self._resize(height, capacity)

    def shrink(self, rows: int, length: int) -> None:
        """Give back storage the first ROWS rows of LENGTH tokens do not need, when that frees three quarters or more.

        Without rows it frees everything. The threshold keeps rows coming and going from copying the cache each step.
        """
        if rows == 0:
            if self.keys:
                self.keys, self.values, self.height, self.capacity = [], [], 0, 0
                trim()
            return
        height, capacity = min(self.rows, _power_of_two(rows)), max(64, _power_of_two(length))
        if 4 * height * capacity <= self.height * self.capacity:
            self._resize(height, capacity)
            trim()

    def nbytes(self) -> int:
        """Memory the stored keys and values take."""
        return sum(tensor.nbytes for store in (self.keys, self.values) for tensor in store)

    def _resize(self, height: int, capacity: int) -> None:
        if (height, capacity) == (self.height, self.capacity):
            return
        rows, tokens = min(height, self.height), min(capacity, self.capacity)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                resized = old.new_zeros((height, old.shape[1], capacity, old.shape[3]))
                resized[:rows, :, :tokens] = old[:rows, :, :tokens]
                store[layer] = resized
        self.height, self.capacity = height, capacity

    def prefill(self, first_row: int, start: int = 0) -> None:
        """The next forward pass writes prompts into rows FIRST_ROW onwards, from position START on."""
        self._first_row, self._start, self._positions = first_row, start, None

    def decode(self, positions: torch.Tensor) -> None:
        """The next forward pass adds one token per running row, row i at POSITIONS[i]."""
        self._positions = positions

    def move(self, source: int, target: int) -> None:
        """Copy row SOURCE into row TARGET (to keep the running rows contiguous)."""
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target] = tensor[source]

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer: int, *args: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's keys and values for LAYER; return those the attention must see."""
        if layer == len(self.keys):
            shape = (self.height, key.shape[1], self.capacity, key.shape[3])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        keys, values = self.keys[layer], self.values[layer]
        if self._positions is None:
            rows = slice(self._first_row, self._first_row + key.shape[0])
            start, end = self._start, self._start + key.shape[2]
            keys[rows, :, start:end] = key
            values[rows, :, start:end] = value
            if start:  # a later chunk of a prompt attends to the chunks before it too
                return keys[rows, :, :end], values[rows, :, :end]
            # A row's positions past its tokens are masked, but 0 * NaN is NaN: what an earlier request (one whose
            # adapter overflowed, say) left there must not reach this one's attention.
            keys[rows, :, end:] = 0
            values[rows, :, end:] = 0
            return key, value
        count = key.shape[0]
        index = torch.arange(count)
        keys[index, :, self._positions] = key[:, :, 0]
        values[index, :, self._positions] = value[:, :, 0]
        length = int(self._positions.max()) + 1
        return keys[:count, :, :length], values[:count, :, :length]


def _glibc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None on another C library."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _glibc_trim()


def trim() -> None:
    """Hand freed memory back to the system: glibc keeps freed blocks under its mmap threshold (which grows to
    32 MB as large tensors are freed), so without this the process stays at a long request's peak."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _power_of_two(n: int) -> int:
    """The smallest power of two at least N (N >= 1)."""
    return 1 << (n - 1).bit_length()
