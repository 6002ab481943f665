"""A compiled segmented LoRA kernel for decode passes: every row's own LoRA pair in one call, weights read in place.

`sgmv.c` is built with the system's C compiler the first time a process needs it (a fraction of a second); where
no compiler works the LoRA layers keep their batched-matmul path, which gives the same result.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("serve")

SOURCE = Path(__file__).with_name("sgmv.c")
MAX_RANK = 256  # the kernel's per-row scratch holds this many ranks


@cache
def _library() -> ctypes.CDLL | None:
    """The built kernel, or None where it cannot be built (the caller falls back to matmuls)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("No C compiler: LoRA layers use batched matmuls.")
        return None
    with tempfile.TemporaryDirectory() as folder:
        built = Path(folder) / "sgmv.so"
        # -fopenmp links libgomp.so.1, which resolves to the copy torch already loaded: one thread team for both.
        command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(built), str(SOURCE)]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
            library = ctypes.CDLL(str(built))  # mapped: the file may go once loaded
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("Building the LoRA kernel failed (%s): LoRA layers use batched matmuls.", exc)
            return None
    library.lora_apply.restype = ctypes.c_int
    pointer, count = ctypes.c_void_p, ctypes.c_int64
    library.lora_apply.argtypes = [pointer] * 4 + [count] + [pointer] * 2 + [count] * 3
    return library


def available() -> bool:
    """Whether the kernel is built (building it on first call)."""
    return _library() is not None


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
    library = _library()
    assert library is not None and fits(x, out, a, b)
    status = library.lora_apply(
        x.data_ptr(), out.data_ptr(), rows.data_ptr(), slots.data_ptr(), rows.numel(),
        a.data_ptr(), b.data_ptr(), a.shape[1], a.shape[2], b.shape[2],
    )  # fmt: skip
    if status:
        raise MemoryError("the LoRA kernel could not allocate its block list")
