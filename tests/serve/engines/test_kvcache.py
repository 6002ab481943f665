"""The block cache: storage follows the tokens rows hold, every row reads its own tokens, and the compiled decode
attention gives what torch's attention gives."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adapterctl.serve.engines.transformers import attention
from adapterctl.serve.engines.transformers.kvcache import BLOCK, BlockCache

HEADS, KV_HEADS, DIM = 4, 2, 8
LAYER = SimpleNamespace(layer_idx=0, num_key_value_groups=HEADS // KV_HEADS, is_causal=True)


def tokens(rows: int, length: int) -> torch.Tensor:
    """Random keys (or values) for ROWS rows of LENGTH tokens, as an attention layer hands them over."""
    return torch.randn(rows, KV_HEADS, length, DIM)


def packed(keys: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The first LENGTHS[i] tokens of each row of KEYS, one after the other, as a pass hands them over."""
    return torch.cat([keys[i, :, :length] for i, length in enumerate(lengths)], dim=1)[None]


def prefill(cache: BlockCache, first: int, keys: torch.Tensor, lengths: list[int], start: int = 0) -> None:
    cache.pack(list(range(first, first + len(lengths))), [start] * len(lengths), lengths)
    cache.update(packed(keys, lengths), packed(keys, lengths) + 1, 0)


def stored(cache: BlockCache, row: int, length: int) -> torch.Tensor:
    """Row ROW's first LENGTH keys as the cache holds them, (key/value heads, tokens, dim)."""
    slots = torch.tensor([cache.tables[row][t // BLOCK] * BLOCK + t % BLOCK for t in range(length)])
    return cache.keys[0][slots].transpose(0, 1)


def decode(cache: BlockCache, query: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One pass of each row's next token: the attention output for QUERY (rows, heads, 1, dim), NEW keys (values
    NEW + 1) at POSITIONS, (rows, 1, heads, dim)."""
    cache.pack(list(range(len(positions))), positions.tolist(), [1] * len(positions))
    keys = new.transpose(0, 2)
    cache.update(keys, keys + 1, 0)
    return cache.attend(LAYER, query.transpose(0, 2), keys, keys + 1, None, None)[0][:, None]


def textbook(query: torch.Tensor, keys: torch.Tensor, start: int) -> torch.Tensor:
    """Attention for QUERY (heads, tokens, dim) at positions START.. over a row's KEYS (key/value heads, all, dim),
    values KEYS + 1, each query seeing the keys up to its own position: (tokens, heads, dim)."""
    k = keys.repeat_interleave(HEADS // KV_HEADS, dim=0)
    seen = torch.arange(k.shape[1])[None, :] <= start + torch.arange(query.shape[1])[:, None]
    scores = (query @ k.transpose(1, 2) / DIM**0.5).masked_fill(~seen, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ (k + 1)).transpose(0, 1)


def test_storage_follows_the_tokens_each_row_holds_not_rows_times_the_longest():
    torch.manual_seed(0)
    cache = BlockCache(rows=8, capacity=1024)
    long = tokens(1, 1000)
    prefill(cache, 0, long, [1000])
    short = tokens(7, 10)
    prefill(cache, 1, short, [10, 9, 8, 7, 6, 5, 4])
    assert cache.held() == 63 + 7  # 1000 tokens in 63 blocks, each short row in one
    assert cache.blocks == 128
    per_slot = 2 * KV_HEADS * DIM * 4  # keys and values, float32
    assert cache.nbytes() == (128 * BLOCK + 1) * per_slot  # rows x the longest would be 8 x 1024 slots
    cache.keep([7, 1, 2, 3, 4, 5, 6])  # the long request ends: the last row takes its place
    cache.shrink(7)
    assert (cache.held(), cache.blocks) == (7, 8)  # compacted: three quarters and more lay free
    assert torch.equal(stored(cache, 0, 4), short[6, :, :4]) and torch.equal(stored(cache, 1, 10), short[0])
    cache.shrink(0)
    assert cache.nbytes() == 0 and cache.blocks == 0


def test_rows_keep_their_tokens_through_reordering_growth_and_compaction():
    torch.manual_seed(0)
    cache = BlockCache(rows=4, capacity=1024)
    keys = tokens(3, 40)
    prefill(cache, 0, keys, [40, 30, 20])
    chunk = tokens(1, 64)
    prefill(cache, 3, chunk[:, :, :32], [32])  # a long prompt in two chunks: the pool grows between them
    prefill(cache, 3, chunk[:, :, 32:], [32], start=32)
    cache.keep([2, 1, 3])  # row 0 ends; row 2 takes its place, the long one moves down
    cache.shrink(3)
    assert torch.equal(stored(cache, 0, 20), keys[2, :, :20])
    assert torch.equal(stored(cache, 1, 30), keys[1, :, :30])
    assert torch.equal(stored(cache, 2, 64), chunk[0])
    cache.keep([2])
    cache.shrink(1)  # 4 blocks of 16 held: compacted
    assert (cache.held(), cache.blocks) == (4, 4)
    assert torch.equal(stored(cache, 0, 64), chunk[0])


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_decode_attends_to_each_rows_own_tokens_and_never_to_what_freed_blocks_hold(kernel, monkeypatch):
    torch.manual_seed(0)
    if not kernel:
        monkeypatch.setattr(attention, "fits", lambda *args: False)
    else:
        assert attention.fits(torch.zeros(1, 1, 1, 1), torch.zeros(1))  # the compiler is there: the kernel runs
    cache = BlockCache(rows=4, capacity=1024)
    prefill(cache, 0, tokens(2, 70), [70, 70])
    for pool in (cache.keys[0], cache.values[0]):  # what rows whose adapter overflowed leave in their blocks
        pool[:-1] = float("nan")
    lengths = [37, 3, 20]
    keys = tokens(3, 37)
    prefill(cache, 0, keys, lengths)  # rows 0 and 1 start afresh: the new rows reuse those blocks, tails and all
    assert torch.isnan(cache.keys[0][: cache.blocks * BLOCK]).any()
    query, new = torch.randn(3, HEADS, 1, DIM), tokens(3, 1)
    out = decode(cache, query, new, torch.tensor(lengths))
    assert out.shape == (3, 1, HEADS, DIM)
    for row, length in enumerate(lengths):  # each row alone, by the textbook
        expected = textbook(query[row], torch.cat([keys[row, :, :length], new[row]], dim=1), length)
        torch.testing.assert_close(out[row, 0], expected[0])


def test_a_later_chunk_attends_to_the_chunks_before_it():
    torch.manual_seed(0)
    cache = BlockCache(rows=2, capacity=1024)
    first, second = tokens(1, 20), tokens(1, 12)
    prefill(cache, 1, first, [20])
    cache.pack([1], [20], [12])
    cache.update(second, second + 1, 0)
    query = torch.randn(1, HEADS, 12, DIM)
    out = cache.attend(LAYER, query, second, second + 1, None, None)
    torch.testing.assert_close(out[0], textbook(query[0], torch.cat([first, second], dim=2)[0], 20))


def test_rows_at_their_own_starts_share_one_pass_and_the_pool_never_passes_its_capacity():
    torch.manual_seed(0)
    cache = BlockCache(rows=3, capacity=8)
    head = tokens(1, 20)
    prefill(cache, 0, head, [20])
    parts = tokens(2, 12)  # row 0 goes on from position 20, row 2 starts afresh, in the same pass
    cache.pack([0, 2], [20, 0], [12, 5])
    cache.update(packed(parts, [12, 5]), packed(parts, [12, 5]) + 1, 0)
    assert torch.equal(stored(cache, 0, 32), torch.cat([head[0], parts[0]], dim=1))
    assert torch.equal(stored(cache, 2, 5), parts[1, :, :5])
    assert cache.blocks <= 8
    with pytest.raises(RuntimeError, match="full"):
        cache.pack([1], [0], [16 * 6])


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_running_rows_tokens_and_prompt_parts_share_one_pass_each_attending_to_its_own_row(kernel, monkeypatch):
    torch.manual_seed(0)
    if not kernel:
        monkeypatch.setattr(attention, "fits", lambda *args: False)
    cache = BlockCache(rows=4, capacity=1024)
    earlier = tokens(2, 40)
    prefill(cache, 0, earlier, [40, 25])  # row 0 runs (40 tokens), row 1 is a prompt half filled (25)
    # One pass: row 0's next token, row 1's next 9 prompt tokens, row 2's whole 6-token prompt, row 3's first token.
    rows, starts, lengths = [0, 1, 2, 3], [40, 25, 0, 0], [1, 9, 6, 1]
    new = tokens(4, 9)
    cache.pack(rows, starts, lengths)
    keys = packed(new, lengths)
    cache.update(keys, keys + 1, 0)
    query = torch.randn(1, HEADS, sum(lengths), DIM)
    out = cache.attend(LAYER, query, keys, keys + 1, None, None)[0]
    assert out.shape == (sum(lengths), HEADS, DIM)
    first = 0
    for row, start, length in zip(rows, starts, lengths, strict=True):  # each segment alone, by the textbook
        before = earlier[row, :, :start] if row < 2 else earlier[0, :, :0]
        row_keys = torch.cat([before, new[row, :, :length]], dim=1)
        expected = textbook(query[0, :, first : first + length], row_keys, start)
        torch.testing.assert_close(out[first : first + length], expected)
        first += length
