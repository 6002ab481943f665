"""A compiled segmented LoRA kernel: every token row's own LoRA pair in one call, weights read in place.

`sgmv.c` is built by `compiler.py`; where no compiler works the LoRA layers keep their batched-matmul path, which gives
the same result.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from typing import Any

import torch

from adapterctl.serve.engines.transformers.kernels import compiler

SOURCE = Path(__file__).with_name("sgmv.c")
MAX_RANK = 256  # the kernel's per-row scratch holds this many ranks


@cache
def _kernel() -> Any:
    """The built kernel, or None where it cannot be built (the caller falls back to matmuls)."""
    pointer, count = ctypes.c_void_p, ctypes.c_int64
    return compiler.function(SOURCE, "lora_apply", [pointer] * 4 + [count] + [pointer] * 2 + [count] * 3)


def available() -> bool:
    """Whether the kernel is built (building it on first call)."""
    return _kernel() is not None


def fits(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: float32, contiguous, a rank it has room for."""
    return (
        all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in (x, out, a, b))
        and a.shape[2] <= MAX_RANK
        and available()
    )


def apply(
    x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> None:
    """OUT[rows[i]] += X[rows[i]] @ A[slots[i]] @ B[slots[i]] for every i, in place; rows sharing a slot adjacent.

    X: (N, d_in), OUT: (N, d_out), A: (S, d_in, r), B: (S, r, d_out), all float32 and contiguous; ROWS, SLOTS int64.
    """
    kernel = _kernel()
    assert kernel is not None and fits(x, out, a, b)
    status = kernel(
        x.data_ptr(), out.data_ptr(), rows.data_ptr(), slots.data_ptr(), rows.numel(),
        a.data_ptr(), b.data_ptr(), a.shape[1], a.shape[2], b.shape[2],
    )  # fmt: skip
    if status:
        raise MemoryError("the LoRA kernel could not allocate its block list")
