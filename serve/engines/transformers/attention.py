"""The model's attention, routed to the block cache: a running row's next token reads its row's tokens in place.

Registered with transformers' attention interface as NAME; the runner passes its cache to the model as the `blocks`
keyword, which reaches every attention layer. `kernels/attention.c` is built by `kernels/compiler.py`; where no
compiler works those rows' keys and values are gathered for torch's scaled dot-product attention, with the same
result.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from adapterctl.serve.engines.transformers.kernels import compiler

NAME = "adapters-blocks"
SOURCE = Path(__file__).parent / "kernels" / "attention.c"


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    blocks: Any,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention output, (rows, tokens, heads, head dim), as the block cache computes it for this pass."""
    return blocks.attend(module, query, key, value, attention_mask, scaling), None


AttentionInterface.register(NAME, attention)


def sdpa(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:  # fmt: skip
    """Torch's scaled dot-product attention as transformers calls it (key/value heads repeated for the query's)."""
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)[0]


@cache
def _kernel() -> Any:
    """The built kernel, or None where it cannot be built (running rows' tokens gather for torch's attention)."""
    pointer, count = ctypes.c_void_p, ctypes.c_int64
    argtypes = [pointer] * 5 + [count, pointer] + [count] * 5 + [ctypes.c_float]
    return compiler.function(SOURCE, "attention_decode", argtypes)


def fits(query: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the kernel takes these: float32 on the CPU (and the kernel is built)."""
    return (
        query.dtype == keys.dtype == torch.float32
        and query.device.type == keys.device.type == "cpu"
        and _kernel() is not None
    )


def decode(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
    block: int, scaling: float,
) -> torch.Tensor:  # fmt: skip
    """Each row's query (rows, heads, 1, dim) attending to its LENGTHS[i] tokens, found through TABLES[i] in KEYS and
    VALUES (token slots x key/value heads x dim, a token slot = block id * BLOCK + offset); (rows, 1, heads, dim)."""
    kernel = _kernel()
    assert kernel is not None
    query = query.contiguous()
    rows, heads, _, dim = query.shape
    out = torch.empty_like(query)
    status = kernel(
        query.data_ptr(), out.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.data_ptr(), tables.shape[1],
        lengths.data_ptr(), rows, heads, keys.shape[1], dim, block, scaling,
    )  # fmt: skip
    if status:
        raise MemoryError("the attention kernel could not allocate its scores")
    return out.transpose(1, 2)
