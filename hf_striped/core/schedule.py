"""The ring schedule, forward and backward, as one generator per rank (see ``transport.py``).

At step s = 0..P-1 rank r holds the K/V that started on rank (r - s) mod P. It posts the
rotation of that K/V *before* computing on it (double buffer: the block in use and the one in
flight), so communication overlaps compute. K/V travel with ``kv_heads`` heads (never repeated
for GQA). Running output and log-sum-exp stay in float32 (float64 for float64 inputs).

Backward re-runs the same rotation; every block's backward kernel is given the final output
and lse of its rows, so block gradients are exact partial sums. dQ accumulates locally; the
dK/dV partial sums travel around the ring with their K/V (one step behind, so that transfer
also overlaps compute: a rank runs its kernels first, then adds their key gradients into the
sums it receives, touching only the keys its calls saw) and arrive home after P hops.

With packed documents, a whole document (on one rank, seeing only itself) may be computed at
any step on the rank's own K/V (``RingPlan.local_blocks``): the placement puts each where the
split documents leave the step's slowest rank room.
"""

from __future__ import annotations

import torch

import functools
from dataclasses import dataclass
from typing import Any

from .documents import Placement, deferred_blocks, placement_blocks
from .layout import Block, blocks
from .merge import merge_
from .transport import Post, Schedule, Wait


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Watch:
    """What looks at one rank's ring steps: the finite guard
    (:class:`hf_striped.core.guards.FiniteGuard`) and the hooks
    (:class:`hf_striped.core.options.RingHooks`); either may be ``None``."""

    guard: Any = None
    hooks: Any = None
    name: str | None = None

    def step(self, phase: str, step: int) -> None:
        if self.hooks is not None and self.hooks.on_step is not None:
            self.hooks.on_step(phase, step, self.name)

    def block(self, phase: str, step: int, source: int, results: dict, lse=None) -> None:
        if self.hooks is not None and self.hooks.on_block is not None:
            self.hooks.on_block(phase, step, self.name, results)
        if self.guard is not None:
            self.guard.block(phase, step, source, lse=lse, **results)


_UNWATCHED = Watch()


def _features(blk: Block, softcap: float | None) -> dict:
    """The keyword features of one kernel call (only those it uses: see ``KernelCapabilities``)."""
    out = {} if blk.band is None else {"band": blk.band}
    if softcap is not None:
        out["softcap"] = softcap
    return out


def kernel_split(kernels, split: int | None = None) -> int:
    """The causal split (see :func:`hf_striped.core.layout.blocks`) to use with ``kernels`` (a
    ``KernelChain``): ``split`` if given, else what its first kernel declares."""
    return int(kernels.capabilities.causal_split) if split is None else int(split)


def _rows(x: torch.Tensor, sl: slice, blk: Block) -> torch.Tensor:
    """Rows ``sl`` (dim 1) of every piece of ``blk``, pieces folded into the batch:
    ``[b, c, ...] -> [b * count, L, ...]``. A view when ``x`` is contiguous in its first two
    dims (pieces tile the sequence, so the batch and piece strides merge); a copy otherwise."""
    if blk.count == 1:
        return x[:, sl]
    start, stop, _ = sl.indices(x.shape[1])
    length = stop - start
    span = (blk.count - 1) * blk.period + length
    return x.narrow(1, start, span).unfold(1, length, blk.period).movedim(-1, 2).flatten(0, 1)


def _target(x: torch.Tensor, sl: slice, blk: Block) -> torch.Tensor:
    """:func:`_rows` of an accumulator, which must come back as a view (writes go through it)."""
    y = _rows(x, sl, blk)
    if blk.count > 1 and not y._is_view():  # pragma: no cover - accumulators are contiguous
        raise AssertionError("batched block rows of an accumulator must be a view")
    return y


def _lse_rows(lse: torch.Tensor, sl: slice, blk: Block) -> torch.Tensor:
    """:func:`_rows` for a log-sum-exp ``[b, h, c]`` (sequence in dim 2): ``[b * count, h, L]``."""
    if blk.count == 1:
        return lse[:, :, sl]
    return _rows(lse.transpose(1, 2), sl, blk).transpose(1, 2)


def forward_step(q, k, v, out, lse_t, blks: list[Block], kernels, scale: float, *, softcap: float | None = None,
                 watch: Watch = _UNWATCHED, step: int = 0, source: int = 0) -> None:
    """Fold one K/V block (the kernel calls ``blks``) into the running result, in place.

    ``q`` ``[b, c, h, d]``; ``k``/``v`` ``[b, c, hk, d]``; ``out`` ``[b, c, h, d]`` and ``lse_t``
    ``[b, c, h]`` (the log-sum-exp stored sequence-major, so batched pieces fold as views) are
    contiguous float32/float64 accumulators. This is the whole compute of one ring step; the
    benchmark times it per (rank, step). ``kernels``: a ``KernelChain`` (each block goes to the
    kernel that can compute it). ``watch`` sees every block's result, reported as ring ``step``
    with K/V from rank ``source``."""
    for blk in blks:
        keys = _rows(k, blk.k, blk)
        o_b, lse_b = kernels.for_block(blk.band).forward(
            _rows(q, blk.q, blk), keys, _rows(v, blk.k, blk), blk.causal, scale, **_features(blk, softcap),
        )
        watch.block("forward", step, source, {"the block output": o_b}, lse=lse_b)
        # a full or causal call over at least one key: every row sees a key (merge_'s short path)
        merge_(_target(out, blk.q, blk), _target(lse_t, blk.q, blk).transpose(1, 2), o_b, lse_b,
               every_row=blk.band is None and keys.shape[1] > 0)


def _key_writes(blks: list[Block], c: int) -> tuple[list[bool], list[tuple[int, int]]]:
    """How a step's calls fill a ``c``-key gradient buffer without zero-filling all of it first:
    per call, whether none of its keys was touched by an earlier call (it writes its part, no
    add), and the key ranges to zero before the first call (those no call touches, and the
    not-yet-touched part of calls that add). Writing ``x`` gives the bits of ``0 + x``."""
    seen: list[tuple[int, int]] = []
    writes, zero = [], []
    for blk in blks:
        ranges = [k.indices(c)[:2] for _, k in blk.pieces(c)]
        fresh = not any(a < y and x < b for a, b in ranges for x, y in seen)
        writes.append(fresh)
        if not fresh:
            for a, b in ranges:
                zero += _minus((a, b), seen)
        seen += ranges
    return writes, zero + _minus((0, c), seen)


def _minus(span: tuple[int, int], cover: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``span`` outside every range of ``cover``."""
    parts = [span]
    for x, y in cover:
        parts = [p for a, b in parts for p in ((a, min(b, x)), (max(a, y), b)) if p[0] < p[1]]
    return parts


def _fresh_buffers(blks: list[Block], k: torch.Tensor, v: torch.Tensor, dtype) -> tuple:
    """Uninitialised dK/dV buffers with only the ranges :func:`_key_writes` says zeroed, and its
    per-call write flags."""
    writes, zero = _key_writes(blks, k.shape[1])
    dk = torch.empty(k.shape, dtype=dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=dtype, device=v.device)
    for a, b in zero:
        dk[:, a:b].zero_()
        dv[:, a:b].zero_()
    return dk, dv, writes


def backward_parts(dout, q, k, v, out, lse, dq, blks: list[Block], kernels, scale: float, *,
                   softcap: float | None = None, watch: Watch = _UNWATCHED, step: int = 0,
                   source: int = 0) -> list[tuple[Block, torch.Tensor, torch.Tensor]]:
    """The kernel half of :func:`backward_step`: adds the calls' dq into ``dq`` in place and
    returns each call's ``(block, dk, dv)``, for the caller to add where the key gradients are
    summed (:func:`add_parts`)."""
    parts = []
    for blk in blks:
        dq_b, dk_b, dv_b = kernels.for_block(blk.band).backward(
            _rows(dout, blk.q, blk),
            _rows(q, blk.q, blk),
            _rows(k, blk.k, blk),
            _rows(v, blk.k, blk),
            _rows(out, blk.q, blk),
            _lse_rows(lse, blk.q, blk),
            blk.causal,
            scale,
            **_features(blk, softcap),
        )
        watch.block("backward", step, source, {"the block's dq": dq_b, "dk": dk_b, "dv": dv_b})
        _target(dq, blk.q, blk).add_(dq_b)
        parts.append((blk, dk_b, dv_b))
    return parts


def add_parts(parts, into: tuple[torch.Tensor, torch.Tensor], writes: list[bool] | None = None) -> None:
    """Add each call's key gradients (:func:`backward_parts`) into ``into`` (dK, dV) in place;
    ``writes[i]``: call i's keys are untouched so far, so it writes instead of adding."""
    for i, (blk, dk_b, dv_b) in enumerate(parts):
        for total, part in zip(into, (dk_b, dv_b)):
            target = _target(total, blk.k, blk)
            target.copy_(part) if writes is not None and writes[i] else target.add_(part)


def gather_parts(parts, k: torch.Tensor, v: torch.Tensor, acc: torch.dtype):
    """The calls' key gradients as fresh ``(dk, dv)`` shaped like k/v in ``acc`` (``None``
    without calls): a single call covering every key gives the kernel's own gradients; else
    each call writes its keys' first touch and adds the rest, and only keys no call touches are
    zero-filled (:func:`_key_writes`)."""
    if not parts:
        return None, None
    blk, dk_b, dv_b = parts[0]
    if len(parts) == 1 and blk.count == 1 and blk.k.indices(k.shape[1])[:2] == (0, k.shape[1]):
        return dk_b.to(acc), dv_b.to(acc)  # the kernel's fresh output (or its float32 copy): ours to modify
    dk, dv, writes = _fresh_buffers([p[0] for p in parts], k, v, acc)
    add_parts(parts, (dk, dv), writes)
    return dk, dv


def backward_step(dout, q, k, v, out, lse, dq, blks: list[Block], kernels, scale: float, acc: torch.dtype, *,
                  softcap: float | None = None, watch: Watch = _UNWATCHED, step: int = 0, source: int = 0,
                  into: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One ring step's backward: adds this K/V block's share to ``dq`` (contiguous, ``acc``
    dtype) in place and returns its partial ``(dk, dv)`` (``None`` when nothing is visible;
    :func:`gather_parts`), or adds them into ``into`` (shaped like k/v) and returns that.
    ``out``/``lse`` are the final output and log-sum-exp ``[b, h, c]`` of the local rows."""
    parts = backward_parts(dout, q, k, v, out, lse, dq, blks, kernels, scale, softcap=softcap, watch=watch,
                           step=step, source=source)
    if into is None:
        return gather_parts(parts, k, v, acc)
    add_parts(parts, into)
    return into


@dataclass(frozen=True, kw_only=True)
class RingPlan:
    """One rank's view of a ring pass: everything its schedule needs besides the tensors."""

    rank: int
    world_size: int
    layout: str
    causal: bool
    scale: float
    kernels: Any
    """The call's ``KernelChain`` (each block goes to the kernel that can compute it)."""
    split: int | None = None
    """Causal split of the blocks (default: what the first kernel declares)."""
    window: int | None = None
    """Sliding window in tokens (``None``: plain causal), see ``layout.blocks``."""
    softcap: float | None = None
    """Logit soft-capping (the chain must start with a kernel that can)."""
    watch: Watch = _UNWATCHED
    """The finite guard and hooks that see every step and block."""
    placement: Placement | None = None
    """Where packed documents' tokens lie (``hf_striped.core.documents``); ``None``: one
    sequence per row in the layout's own positions."""

    def blocks(self, source: int, c: int) -> list[Block]:
        """The kernel calls of the (this rank, ``source``) block of ``c`` tokens per rank."""
        if self.placement is not None:
            return _placement_blocks(self.placement, self.rank, source, self.causal, self.window)
        return blocks(self.layout, self.rank, source, self.world_size, c, self.causal,
                      split=kernel_split(self.kernels, self.split), window=self.window)

    def local_blocks(self, step: int) -> list[Block]:
        """The calls this rank makes at ``step`` on its own K/V besides the step's block (whole
        packed documents scheduled there: :func:`hf_striped.core.documents.deferred_blocks`)."""
        if self.placement is None or not self.placement.run_steps or step == 0:
            return []
        return _deferred_blocks(self.placement, self.rank, step, self.causal, self.window)

    def travel(self, c: int) -> int:
        """How many leading local tokens other ranks attend to: what ring messages carry."""
        return c if self.placement is None else self.placement.travel

    def steps(self, c: int) -> int:
        """Ring steps: P, or one (no messages at all) when no rank attends to another's tokens."""
        return self.world_size if self.travel(c) else 1


@functools.lru_cache(maxsize=256)  # a rank needs P entries per forward; each row brings new ones
def _placement_blocks(placement: Placement, rank: int, source: int, causal: bool, window) -> list[Block]:
    return placement_blocks(placement, rank, source, causal, window)


@functools.lru_cache(maxsize=256)
def _deferred_blocks(placement: Placement, rank: int, step: int, causal: bool, window) -> list[Block]:
    return deferred_blocks(placement, rank, step, causal, window)


def _head(kv: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """The first ``n`` local tokens of each tensor (all of them when ``n`` covers the sequence)."""
    return kv if n >= kv[0].shape[1] else tuple(x[:, :n] for x in kv)


def forward_schedule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> Schedule:
    """One rank's forward ring. Returns ``(out, lse)``: the merged output ``[b, c, h, d]`` and
    log-sum-exp ``[b, h, c]``, both still in the float32 (float64) accumulation dtype. Step 0
    computes with all local K/V; the messages carry only the part other ranks attend to."""
    rank, world_size, watch = plan.rank, plan.world_size, plan.watch
    b, c, h, d = q.shape
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(b, c, h, v.shape[-1], dtype=acc, device=q.device)
    lse_t = torch.full((b, c, h), float("-inf"), dtype=acc, device=q.device)
    kv, steps = (k, v), plan.steps(c)
    for step in range(steps):
        last = step == steps - 1
        if not last:
            ticket = yield Post(_head(kv, plan.travel(c)), "K/V", step)
        source = (rank - step) % world_size
        watch.step("forward", step)
        forward_step(q, kv[0], kv[1], out, lse_t, plan.blocks(source, c), plan.kernels, plan.scale,
                     softcap=plan.softcap, watch=watch, step=step, source=source)
        forward_step(q, k, v, out, lse_t, plan.local_blocks(step), plan.kernels, plan.scale,
                     softcap=plan.softcap, watch=watch, step=step, source=rank)
        if not last:
            kv = yield Wait(ticket)
    return out, lse_t.transpose(1, 2).contiguous()


def _zeros_kv(k: torch.Tensor, v: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(k.shape, dtype=dtype, device=k.device), torch.zeros(v.shape, dtype=dtype, device=v.device)


def backward_schedule(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, plan: RingPlan) -> Schedule:
    """One rank's backward ring, given the final ``out`` and ``lse`` ``[b, h, c]`` of its rows.
    Returns ``(dq, dk, dv)`` in the dtypes of q, k, v."""
    rank, world_size, watch = plan.rank, plan.world_size, plan.watch
    c = q.shape[1]
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv, steps, travel = (k, v), plan.steps(c), plan.travel(c)
    dkv_ticket = stay = late = None
    for step in range(steps):
        last = step == steps - 1
        if not last:
            kv_ticket = yield Post(_head(kv, travel), "K/V", step)
        source = (rank - step) % world_size
        watch.step("backward", step)
        parts = backward_parts(dout, q, kv[0], kv[1], out, lse, dq, plan.blocks(source, c), plan.kernels,
                               plan.scale, softcap=plan.softcap, watch=watch, step=step, source=source)
        local = plan.local_blocks(step)
        if local:  # whole documents scheduled at this step: only their own calls reach their keys
            late = late or _zeros_kv(k, v, acc)
            backward_step(dout, q, k, v, out, lse, dq, local, plan.kernels, plan.scale, acc,
                          softcap=plan.softcap, watch=watch, step=step, source=rank, into=late)
        if step == 0:
            dk, dv = gather_parts(parts, k, v, acc)
            if dk is None:  # nothing of our own K/V is visible here: start the partial sums at zero
                dk, dv = _zeros_kv(k, v, acc)
            if steps > 1 and travel < c:  # gradients of keys no other rank sees stay here
                stay = (dk[:, travel:], dv[:, travel:])
                dk, dv = dk[:, :travel].contiguous(), dv[:, :travel].contiguous()
        else:  # the partial sums for this K/V from the ranks it visited before: ours go into them
            dk, dv = yield Wait(dkv_ticket)
            add_parts(parts, (dk, dv))
        if steps > 1:
            dkv_ticket = yield Post((dk, dv), "dK/dV partial sums", step)
        if not last:
            kv = yield Wait(kv_ticket)
    if steps > 1:
        dk, dv = yield Wait(dkv_ticket)  # our own K/V's gradient, home after P hops
        if stay is not None:
            dk, dv = torch.cat([dk, stay[0]], dim=1), torch.cat([dv, stay[1]], dim=1)
    if late is not None:  # exact: each of these keys has no other term
        dk, dv = dk + late[0], dv + late[1]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
