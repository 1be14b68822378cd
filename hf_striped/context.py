"""``context_parallel``: the context in which ``striped_ring`` attention modules run as ring
attention over a process group."""

from __future__ import annotations

import contextlib
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .kernels import BACKENDS
from .layout import check_layout, global_indices
from .ring import group_rank_size


@dataclass(kw_only=True)
class ContextParallelState:
    """What an active ``context_parallel`` block tells the attention modules."""

    group: dist.ProcessGroup | None
    """The context-parallel group (``None``: this process alone)."""
    layout: str
    """How every sequence was sharded over ``group`` (``hf_striped.LAYOUTS``)."""
    backend: str = "auto"
    """Block kernel (``hf_striped.kernels.BACKENDS``)."""
    rank: int = field(init=False)
    world_size: int = field(init=False)
    _checked: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_layout(self.layout)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        self.rank, self.world_size = group_rank_size(self.group)

    def new_forward(self) -> None:
        """Forget the last checked position tensor. Called at a point every rank reaches once per
        forward, so whether the check (a collective) runs never differs between ranks."""
        self._checked = None

    def check_positions(self, position_ids: torch.Tensor | None, batch: int, seq_local: int) -> None:
        """Verify that ``position_ids`` are this rank's shard of one unbroken run of global
        positions per row (``base + arange(N)``), identically based on every rank.

        Runs once per forward (all layers share one position tensor; :meth:`new_forward`, called
        by the mask function on every rank, resets the cache), at the cost of one tiny
        all-reduce. Every rank reaches the same verdict, so a bad input raises everywhere instead
        of leaving peers waiting in the ring.
        """
        if position_ids is None:
            raise ValueError(
                "striped_ring attention inside hf_striped.context_parallel needs position_ids: pass each "
                "rank its tokens' *global* positions, e.g. position_ids=hf_striped.shard("
                "torch.arange(seq_len).expand(batch, -1), dim=1, group=group, layout=layout)"
            )
        if self._checked is not None and self._checked() is position_ids:
            return
        pos = position_ids.reshape(-1, position_ids.shape[-1]).expand(batch, -1)
        if pos.shape[-1] != seq_local:
            raise ValueError(
                f"position_ids hold {pos.shape[-1]} positions per row but this rank has {seq_local} tokens"
            )
        gidx = global_indices(self.layout, self.rank, self.world_size, seq_local * self.world_size, pos.device)
        offset = pos.long() - gidx
        bad = (offset != offset[:, :1]).any(dim=1).long()
        base = offset[:, 0]
        verdict = torch.cat([base, -base, bad])
        if self.world_size > 1:
            dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=self.group)
        hi, neg_lo, anybad = verdict[:batch], verdict[batch : 2 * batch], verdict[2 * batch :]
        if bool(anybad.any()) or bool((hi != -neg_lo).any()):
            raise ValueError(
                "position_ids inside hf_striped.context_parallel must be each rank's shard, in the "
                f"{self.layout!r} layout, of one unbroken run of global positions per row (base + 0, 1, ..., "
                "N - 1). Got positions that are not: either they were not passed (the model then "
                "numbers local tokens 0..c-1), they were sharded with another layout, or they restart "
                "inside the row (packed documents, which need document masking that context parallelism "
                "does not do yet). Build them with hf_striped.shard(torch.arange(N).expand(batch, -1), "
                "dim=1, group=group, layout=layout)."
            )
        self._checked = weakref.ref(position_ids)


_ACTIVE: ContextVar[ContextParallelState | None] = ContextVar("hf_striped_context_parallel", default=None)


def active_context() -> ContextParallelState | None:
    """The innermost active ``context_parallel`` state, or ``None``."""
    return _ACTIVE.get()


class _StatesByPositions:
    """Which context a forward ran under, keyed by the ``position_ids`` tensor it used.

    Gradient checkpointing re-runs attention during backward, possibly after the
    ``context_parallel`` block has exited or on an autograd device thread that does not see
    the block's context variable. The recomputation receives the very same ``position_ids``
    tensor as the original forward, so that tensor identifies the state to reuse. Entries die
    with their tensor.
    """

    def __init__(self):
        self._by_id: dict[int, tuple[weakref.ref, ContextParallelState]] = {}

    def remember(self, positions: torch.Tensor, state: ContextParallelState) -> None:
        key = id(positions)
        entry = self._by_id.get(key)
        if entry is not None and entry[0]() is positions and entry[1] is state:
            return
        self._by_id[key] = (weakref.ref(positions, lambda _ref, key=key: self._by_id.pop(key, None)), state)

    def forget(self, positions: torch.Tensor) -> None:
        self._by_id.pop(id(positions), None)

    def lookup(self, positions: torch.Tensor) -> ContextParallelState | None:
        entry = self._by_id.get(id(positions))
        return entry[1] if entry is not None and entry[0]() is positions else None


_RECOMPUTE = _StatesByPositions()


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread (where gradient
    checkpointing recomputes forwards)."""
    current = getattr(torch._C, "_current_graph_task_id", None)  # private, present since torch 2.0
    return current is not None and current() != -1


def state_for_attention_call(position_ids: torch.Tensor | None) -> ContextParallelState | None:
    """The context an attention call must use: the active one; during backward with no active
    one, the one its forward ran under (gradient checkpointing); otherwise ``None``."""
    state = active_context()
    if position_ids is None:
        return state
    if in_backward():
        return state if state is not None else _RECOMPUTE.lookup(position_ids)
    if state is None:
        _RECOMPUTE.forget(position_ids)
    else:
        _RECOMPUTE.remember(position_ids, state)
    return state


@contextlib.contextmanager
def context_parallel(group: dist.ProcessGroup | None, layout: str = "striped", *, backend: str = "auto"):
    """Run every ``striped_ring`` attention module inside this block as ring attention over ``group``.

    Each rank feeds the model its shard of the sequence (:func:`hf_striped.shard` with the same
    ``layout``) and the matching *global* ``position_ids``; RoPE then sees true positions and
    the ring sees the global causal order. ``group=None`` means this process alone. Outside
    the block, ``striped_ring`` behaves exactly like ``sdpa``. ``backward()`` may run inside or
    after the block: gradient checkpointing's recomputation reuses the forward's context.
    """
    state = ContextParallelState(group=group, layout=layout, backend=backend)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)
