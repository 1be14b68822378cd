"""Exact merge of partial attention results by their log-sum-exp.

For a row that has seen key sets A and B with (o_A, lse_A), (o_B, lse_B):
``lse = logaddexp(lse_A, lse_B)`` and ``o = o_A * exp(lse_A - lse) + o_B * exp(lse_B - lse)``.
Written max-shifted so no exponent is positive (no overflow), and rows a block does not touch
(``lse_B = -inf``) keep their values bit for bit, with no NaN even when both sides are empty.
"""

from __future__ import annotations

import torch


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor,
           every_row: bool = False) -> None:
    """Fold one block into the running result, in place.

    Args:
        out: running output ``[b, s, h, d]``, float32 (or float64), updated in place.
        lse: running log-sum-exp ``[b, h, s]``, same dtype as ``out``, updated in place;
            ``-inf`` for rows that have seen no key yet.
        block_out: the block's output ``[b, s, h, d]`` in any float dtype.
        block_lse: the block's log-sum-exp ``[b, h, s]``; ``-inf`` where the block saw no key.
        every_row: the caller knows every row of the block saw a key (a full or causal call:
            ``block_lse`` finite), which allows a shorter path of four operations.
    """
    block_lse = block_lse.to(lse.dtype)
    if every_row:
        # lse may still be -inf (a row's first block): logaddexp then gives block_lse and the
        # weight exp(0) = 1, and lerp with weight 1 returns block_out exactly.
        new = torch.logaddexp(lse, block_lse)
        out.lerp_(block_out.to(out.dtype), torch.exp(block_lse - new).transpose(1, 2).unsqueeze(-1))
        lse.copy_(new)
        return
    new_max = torch.maximum(lse, block_lse)
    # A row with both sides empty has max -inf; shift by 0 there so exp(-inf - 0) = 0, not NaN.
    shift = torch.where(torch.isneginf(new_max), torch.zeros_like(new_max), new_max)
    w_old = torch.exp(lse - shift)  # in [0, 1]
    w_new = torch.exp(block_lse - shift)  # in [0, 1]; one of the two is 1 unless both are empty
    total = w_old + w_new
    touched = w_new > 0
    # o' = a * o + b * o_b with a + b = 1 is one fused pass: o' = lerp(o, o_b, b). It is the
    # whole merge cost of a split causal block (several merges per row and step); an unfused
    # form needs five temporaries the size of `out` (on the CPU about 10% of a full 2k-token
    # kernel call, against about 3% for this pass). Untouched rows get b = 0 and an end point equal to o itself, so they stay bit
    # for bit; on the CPU a cheap all() check skips that masking in the common all-touched case.
    b = (w_new / torch.where(touched, total, torch.ones_like(total))).transpose(1, 2).unsqueeze(-1)
    block_out = block_out.to(out.dtype)
    if out.device.type != "cpu" or not bool(touched.all()):
        block_out = torch.where(touched.transpose(1, 2).unsqueeze(-1), block_out, out)
    out.lerp_(block_out, b)
    lse.copy_(torch.where(touched, shift + torch.log(total), lse))
