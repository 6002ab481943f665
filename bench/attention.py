"""Decode attention over the block cache: the compiled kernel vs torch's attention over a padded per-row cache.

Usage: python bench/attention.py [--repeats 200]

One layer of the embedded model's shape (9 query heads, 3 key/value heads, head dim 64), one new token per row;
each workload runs both ways side by side and prints the time per call and their ratio:
  32 rows of 80-150 tokens; 16 rows of 60-100; 16 rows of 60-100 beside one of 1,900 (a long prompt's row).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterctl.serve.engines.transformers import attention  # noqa: E402
from adapterctl.serve.engines.transformers.kvcache import BLOCK, BlockCache, blocks_for  # noqa: E402

HEADS, KV_HEADS, DIM = 9, 3, 64
LAYER = SimpleNamespace(layer_idx=0, num_key_value_groups=HEADS // KV_HEADS, is_causal=True)


def timed(call: Callable[[], object], repeats: int) -> float:
    """Seconds per call, after a warm-up."""
    for _ in range(5):
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def workload(lengths: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Seconds per decode call for rows of LENGTHS tokens: the kernel over blocks, torch over a padded cache."""
    rows, longest = len(lengths), int(lengths.max())
    cache = BlockCache(rows, capacity=blocks_for(int(lengths.sum())) + rows)
    cache.pack(list(range(rows)), [0] * rows, lengths.tolist())
    # The rows' tokens one after the other, as a pass holds them.
    keys = torch.randn(1, KV_HEADS, int(lengths.sum()), DIM)
    cache.update(keys, keys, 0)
    query = torch.randn(rows, HEADS, 1, DIM)
    tables, held = cache._tables(range(rows)), lengths.clone()
    padded = torch.randn(rows, KV_HEADS, longest, DIM)  # what a per-row cache holds: rows x the longest
    mask = (torch.arange(longest)[None] < lengths[:, None])[:, None, None]
    scale = DIM**-0.5
    kernel = timed(lambda: attention.decode(query, cache.keys[0], cache.values[0], tables, held, BLOCK, scale), repeats)
    torch_padded = timed(lambda: attention.sdpa(LAYER, query, padded, padded, mask, scale), repeats)
    return kernel, torch_padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    if not attention.fits(torch.zeros(1, 1, 1, 1), torch.zeros(1)):
        sys.exit("The attention kernel is not built here (no C compiler): nothing to compare.")
    torch.manual_seed(0)
    workloads = {
        "32 rows of 80-150 tokens": torch.randint(80, 151, (32,)),
        "16 rows of 60-100 tokens": torch.randint(60, 101, (16,)),
        "16 rows of 60-100 + one of 1,900": torch.cat([torch.randint(60, 101, (16,)), torch.tensor([1900])]),
    }
    threads = torch.get_num_threads()
    print(f"{'workload':36} {'kernel':>10} {'torch, padded':>14} {'torch / kernel':>15}  ({threads} threads)")
    for name, lengths in workloads.items():
        kernel, padded = workload(lengths, args.repeats)
        print(f"{name:36} {kernel * 1e3:8.2f} ms {padded * 1e3:11.2f} ms {padded / kernel:14.1f}x")


if __name__ == "__main__":
    main()
