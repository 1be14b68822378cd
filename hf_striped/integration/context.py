"""``context_parallel``: the context in which ``striped_ring`` attention modules run as ring
attention over a process group."""

from __future__ import annotations

import contextlib
import os
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..core.options import RingOptions, build_options
from ..core.ring import group_rank_size
from .positions import Documents, PositionCheck, run_check


@dataclass(kw_only=True)
class ContextParallelState:
    """What an active ``context_parallel`` block tells the attention modules."""

    group: dist.ProcessGroup | None
    """The context-parallel group (``None``: this process alone)."""
    options: RingOptions
    """Layout, kernel, timeout and NaN guard of every ring call in the block."""
    train_step: int | None = None
    """The training step, named in NaN/Inf errors; set it as training advances."""
    rank: int = field(init=False)
    world_size: int = field(init=False)
    generation_cache: object = field(default=None, init=False, repr=False)
    """The StripedCache of the model forward now running with a cache (generation), if any."""
    _checked: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.group is None and not (dist.is_available() and dist.is_initialized()) and _launched_world() > 1:
            raise RuntimeError(
                f"hf_striped.context_parallel got no process group in a process launched as one of WORLD_SIZE="
                f"{_launched_world()}, and torch.distributed is not initialised (torch.distributed.group.WORLD is "
                "None until it is): call torch.distributed.init_process_group(...) (or create the Accelerator or "
                "hf_striped.ContextParallel) before entering the context, and pass its group"
            )
        self.rank, self.world_size = group_rank_size(self.group)

    @property
    def layout(self) -> str:
        return self.options.layout

    def new_forward(self) -> None:
        """Forget the last checked position tensor. Called at a point every rank reaches once per
        forward, so whether the check (a collective) runs never differs between ranks."""
        self._checked = None

    def check_positions(self, position_ids: torch.Tensor | None, batch: int, seq_local: int, *,
                        fields: dict[str, int] | None = None, error: BaseException | None = None,
                        peer_error=None, judge=None, cu_seqlens=None) -> Documents | None:
        """Verify that ``position_ids`` are this rank's shard of one unbroken run of global
        positions per row (``base + arange(N)``), identically based on every rank, or of one
        packed row of documents (positions restarting at 0 per document; ``cu_seqlens``, the
        global boundaries, when the caller has them). Returns the documents (``None``: none).

        Runs once per forward (all layers share one position tensor; :meth:`new_forward`, called
        by the mask function on every rank, resets the cache), as one
        :func:`hf_striped.core.guards.agree` of a fixed number of integers (plus one gather of
        the positions for a packed row given without boundaries), so every rank reaches the same
        verdict and a bad input raises everywhere instead of leaving peers waiting
        (:mod:`hf_striped.integration.positions`).

        ``fields``, ``error`` and ``peer_error`` ride along in that agreement (see ``agree``);
        ``judge(verdict)`` then sees the verdict first and may raise on the ``fields``.
        """
        if position_ids is None:
            raise ValueError(
                "striped_ring attention inside hf_striped.context_parallel needs position_ids: pass each "
                "rank its tokens' *global* positions, e.g. position_ids=hf_striped.shard("
                "torch.arange(seq_len).expand(batch, -1), dim=1, group=group, layout=layout)"
            )
        if self._checked is not None and self._checked[0]() is position_ids:
            return self._checked[1]
        check = PositionCheck(self.layout, self.rank, self.world_size, self.group, self.options.timeout)
        docs = run_check(check, position_ids, batch, seq_local, cu_seqlens, fields=fields or {}, error=error,
                         peer_error=peer_error, judge=judge)
        self._checked = (weakref.ref(position_ids), docs)
        return docs


def _launched_world() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch (1 when not launched that way)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


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
def context_parallel(
    group: dist.ProcessGroup | None,
    layout: str | None = None,
    *,
    backend: str | None = None,
    timeout: float | None = None,
    check_finite: bool | None = None,
    train_step: int | None = None,
    options: RingOptions | None = None,
):
    """Run every ``striped_ring`` attention module inside this block as ring attention over ``group``.

    Each rank feeds the model its shard of the sequence (:func:`hf_striped.shard` with the same
    ``layout``) and the matching *global* ``position_ids``; RoPE then sees true positions and
    the ring sees the global causal order. ``group=None`` means this process alone. Outside
    the block, ``striped_ring`` behaves exactly like ``sdpa``. ``backward()`` may run inside or
    after the block: gradient checkpointing's recomputation reuses the forward's context.

    ``layout`` (default ``"striped"``), ``backend``, ``timeout`` (bounds every wait for a peer:
    a dead or stuck rank raises :class:`hf_striped.RingCommError` naming the ring step and peer)
    and ``check_finite`` (the NaN/Inf guard) are the fields of :class:`hf_striped.RingOptions`;
    pass them, or ``options``. ``train_step`` is named in the guard's errors.
    """
    options = build_options(options, layout=layout, backend=backend, timeout=timeout, check_finite=check_finite)
    state = ContextParallelState(group=group, options=options, train_step=train_step)
    from .generation import attach_while_active  # generation imports this module

    token = _ACTIVE.set(state)
    try:
        with attach_while_active:
            yield state
    finally:
        _ACTIVE.reset(token)
