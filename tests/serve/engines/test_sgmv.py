"""The compiled segmented LoRA kernel against the plain computation it replaces."""

from __future__ import annotations

import pytest
import torch

from adapterctl.serve.engines.transformers.kernels import sgmv


@pytest.mark.parametrize("rank", [7, 16, 20])  # below, at and above one vector register of float32 (AVX-512)
def test_the_kernel_adds_each_rows_own_lora_pair_and_leaves_other_rows_alone(rank):
    torch.manual_seed(0)
    slots, d_in, d_out = 5, 40, 33
    a, b = torch.randn(slots, d_in, rank), torch.randn(slots, rank, d_out)
    x, out = torch.randn(30, d_in), torch.randn(30, d_out)
    # 20 rows on slot 3 (more than a block), a few on others, rows 25.. on no adapter; listed grouped by slot
    used = {row: 3 for row in range(0, 20)} | {20: 0, 21: 4, 22: 0, 23: 1, 24: 4}
    order = sorted(used, key=lambda row: (used[row], row))
    rows, row_slots = torch.tensor(order), torch.tensor([used[row] for row in order])
    expected = out.clone()
    for row, slot in used.items():
        expected[row] += x[row] @ a[slot] @ b[slot]
    assert sgmv.fits(x, out, a, b)
    sgmv.apply(x, out, rows, row_slots, a, b)
    torch.testing.assert_close(out, expected)


def test_tensors_the_kernel_cannot_take_go_to_the_matmul_path():
    a, b, x, out = torch.zeros(2, 4, 3), torch.zeros(2, 3, 5), torch.zeros(6, 4), torch.zeros(6, 5)
    assert sgmv.fits(x, out, a, b)
    assert not sgmv.fits(x.bfloat16(), out, a, b)
    assert not sgmv.fits(x, torch.zeros(5, 6).T, a, b)  # not contiguous
    assert not sgmv.fits(x, out, torch.zeros(2, 4, sgmv.MAX_RANK + 1), torch.zeros(2, sgmv.MAX_RANK + 1, 5))
