"""The ring schedule, forward and backward, as one generator per rank (see ``transport.py``).

At step s = 0..P-1 rank r holds the K/V that started on rank (r - s) mod P. It posts the
rotation of that K/V *before* computing on it (double buffer: the block in use and the one in
flight), so communication overlaps compute. K/V travel with ``kv_heads`` heads (never repeated
for GQA). Running output and log-sum-exp stay in float32 (float64 for float64 inputs).

Backward re-runs the same rotation; every block's backward kernel is given the final output
and lse of its rows, so block gradients are exact partial sums. dQ accumulates locally; the
dK/dV partial sums travel around the ring with their K/V (one step behind, so that transfer
also overlaps compute) and arrive home after P hops.
"""

from __future__ import annotations

import torch

from .layout import blocks
from .merge import merge_
from .transport import Post, Schedule, Wait


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _accumulate(total, part, rows: slice, shape, dtype):
    """``total[:, rows] += part``, starting from ``part`` itself (no zero-filled buffer) when
    it covers every row; ``total`` is ``None`` before the first block of a step."""
    if total is None:
        if part.shape[1] == shape[1]:
            return part.to(dtype)  # the kernel's fresh output (or its float32 copy): ours to modify
        total = torch.zeros(shape, dtype=dtype, device=part.device)
    total[:, rows] += part
    return total


def forward_schedule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rank: int,
    world_size: int,
    layout: str,
    causal: bool,
    scale: float,
    kernel,
) -> Schedule:
    """One rank's forward ring. Returns ``(out, lse)``: the merged output ``[b, c, h, d]`` and
    log-sum-exp ``[b, h, c]``, both still in the float32 (float64) accumulation dtype."""
    b, c, h, d = q.shape
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(b, c, h, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((b, h, c), float("-inf"), dtype=acc, device=q.device)
    kv = (k, v)
    for step in range(world_size):
        last = step == world_size - 1
        if not last:
            ticket = yield Post(kv)
        source = (rank - step) % world_size
        for blk in blocks(layout, rank, source, world_size, c, causal):
            ks, vs = kv[0][:, blk.k], kv[1][:, blk.k]
            o_b, lse_b = kernel.forward(q[:, blk.q], ks, vs, blk.causal, scale)
            merge_(out[:, blk.q], lse[:, :, blk.q], o_b, lse_b)
        if not last:
            kv = yield Wait(ticket)
    return out, lse


def backward_schedule(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    rank: int,
    world_size: int,
    layout: str,
    causal: bool,
    scale: float,
    kernel,
) -> Schedule:
    """One rank's backward ring. Returns ``(dq, dk, dv)`` in the dtypes of q, k, v."""
    c = q.shape[1]
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = (k, v)
    dkv_ticket = None
    for step in range(world_size):
        last = step == world_size - 1
        if not last:
            kv_ticket = yield Post(kv)
        source = (rank - step) % world_size
        dk = dv = None
        for blk in blocks(layout, rank, source, world_size, c, causal):
            dq_b, dk_b, dv_b = kernel.backward(
                dout[:, blk.q],
                q[:, blk.q],
                kv[0][:, blk.k],
                kv[1][:, blk.k],
                out[:, blk.q],
                lse[:, :, blk.q],
                blk.causal,
                scale,
            )
            dq[:, blk.q] += dq_b
            dk = _accumulate(dk, dk_b, blk.k, k.shape, acc)
            dv = _accumulate(dv, dv_b, blk.k, v.shape, acc)
        if dk is None:  # nothing of this K/V is visible here: forward the partial sums unchanged
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        if world_size > 1:
            if dkv_ticket is not None:  # partial sums for this K/V from the ranks it visited before
                dk_prev, dv_prev = yield Wait(dkv_ticket)
                dk += dk_prev
                dv += dv_prev
            dkv_ticket = yield Post((dk, dv))
        if not last:
            kv = yield Wait(kv_ticket)
    if world_size > 1:
        dk, dv = yield Wait(dkv_ticket)  # our own K/V's gradient, home after P hops
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
