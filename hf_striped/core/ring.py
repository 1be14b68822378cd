"""Ring attention as differentiable functions: block kernel -> ``torch.autograd.Function`` ->
public function (the three layers flash-attention uses)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..kernels import select_kernel
from ..kernels.reference import ReferenceKernel
from .layout import BAND_ROWS, check_layout
from .guards import FiniteGuard, collective, collective_device, resolve_check_finite, resolve_timeout
from .schedule import backward_schedule, forward_schedule
from .transport import CommStats, run_dist, run_inprocess


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, size)`` of this process in ``group``; ``(0, 1)`` for ``None``."""
    if group is None:
        return 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "a process group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (or pass group=None for one process)"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be [batch, seq_local, heads, head_dim]; got a {t.dim()}-d tensor of shape "
                f"{tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}; cast q/k/v to float32, bfloat16 or float16")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch, seq_local and head_dim"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]}) (GQA)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def _out_for_backward(kernel, out_acc: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """What backward gets as the final output: the float32 accumulator for kernels whose
    half-precision backward runs in float32 (its row sums D = rowsum(dO * O) then use the
    unrounded output), else the output in the input dtype (no extra memory)."""
    return out_acc if getattr(kernel, "backward_in_float32", False) else out


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Fused kernels read the head dimension as if its stride were 1 (PyTorch's CPU op silently
    returns garbage otherwise); copy only tensors that need it."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _apply_sinks(out_acc: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """Attention sinks after the ring merge: one extra logit ``sinks[h]`` per query head joins
    every row's softmax denominator and carries no value, so ``out * sigmoid(lse - sink)`` and
    ``lse' = logaddexp(lse, sink)``. Returns ``(out', lse')`` in the accumulation dtype."""
    s = sinks.detach().to(lse.dtype)[None, :, None]
    lse_f = torch.logaddexp(lse, s)
    keep = torch.exp(lse - lse_f)  # sigmoid(lse - sink); 0 for rows that see no key
    return out_acc * keep.transpose(1, 2)[..., None].to(out_acc.dtype), lse_f


def _sinks_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """d loss / d sinks for this rank's rows: the sink is a key with value 0, so its score
    gradient is ``p_sink * (0 - rowsum(dout * out))`` with ``p_sink = exp(sink - lse')``."""
    acc = lse.dtype
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [b, h, c]
    p_sink = torch.exp(sinks.detach().to(acc)[None, :, None] - lse)
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)


class _Opts:
    """Per-call settings that are not tensors: ``timeout`` seconds per ring wait, the finite
    ``guard`` (or ``None``) and the ``name`` used in error messages."""

    __slots__ = ("timeout", "guard", "name")

    def __init__(self, timeout: float, guard: FiniteGuard | None, name: str | None):
        self.timeout, self.guard, self.name = timeout, guard, name


def _run(gen, group, opts: _Opts, phase: str):
    if group is None or dist.get_world_size(group) == 1:
        return run_inprocess([gen])[0]
    return run_dist(gen, group, timeout=opts.timeout, phase=phase, name=opts.name)


_DTYPE_CODES = {dt: i for i, dt in enumerate((torch.float64, torch.float32, torch.bfloat16, torch.float16))}


_SIGNATURE = ("batch", "tokens per rank", "query heads", "key/value heads", "head_dim", "value head_dim", "dtype",
              "layout", "causal", "window", "rejected", "rejecting rank")


def peer_signature(q, k, v, layout: str, causal: bool, window: int | None, rejected: bool = False,
                   rank: int = 0) -> torch.Tensor:
    """What every rank of a CP group must agree on for its ring messages to match, as int64
    (fields :data:`_SIGNATURE`; q/k/v ``[b, c, h, d]``). ``rejected``: this rank's own checks
    refused its inputs (then only that, and ``rank``, are filled in)."""
    if rejected:
        values = [0] * (len(_SIGNATURE) - 2) + [1, rank + 1]
    else:
        values = [q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3], _DTYPE_CODES.get(q.dtype, 99),
                  ("striped", "contiguous", "zigzag").index(layout), int(causal), window or 0, 0, 0]
    return torch.tensor(values, dtype=torch.int64)


def check_peer_spread(lo: torch.Tensor, hi: torch.Tensor, q, k, group, name: str | None,
                      local_error: BaseException | None = None) -> None:
    """Raise if the group-wide min ``lo`` and max ``hi`` of :func:`peer_signature` differ, or
    if some rank rejected its inputs (``local_error`` is this rank's own rejection). Every rank
    sees the same ``lo``/``hi``, so every rank raises together."""
    where = f"hf_striped ring attention{f' ({name})' if name else ''}"
    if local_error is not None:
        raise local_error
    if int(hi[-2]):
        raise ValueError(
            f"{where}: CP rank {int(hi[-1]) - 1} of the group rejected its inputs (its error says why and how to fix "
            "them), so this rank stops too instead of waiting for it in the ring"
        )
    differ = [f"{f} ranges {int(a)}..{int(b)}" for f, a, b in zip(_SIGNATURE, lo, hi) if a != b]
    if not differ:
        return
    dtypes = {v: k for k, v in _DTYPE_CODES.items()}
    i = _SIGNATURE.index("dtype")
    differ = [d if not d.startswith("dtype") else
              f"dtype differs ({', '.join(str(dtypes.get(int(c), 'other')) for c in (lo[i], hi[i]))})" for d in differ]
    raise ValueError(
        f"{where}: the ranks of the CP group called it with different "
        f"inputs ({'; '.join(differ)}; this is CP rank {dist.get_rank(group)}: batch {q.shape[0]}, {q.shape[1]} tokens, "
        f"{q.shape[2]}/{k.shape[2]} heads, head_dim {q.shape[3]}, {q.dtype}). Every rank must hold its shard of the "
        "same global batch: shard it with hf_striped.shard (or the StripingCollator) with the same layout on every "
        "rank, and load the same model config and dtype everywhere."
    )


def _check_peers(q, k, v, group, layout, causal, window, timeout: float, name: str | None,
                 local_error: BaseException | None) -> None:
    """Every rank of ``group`` must call the ring with the same shapes and settings, or the
    messages it exchanges would not match (a hang, or garbage); and a rank whose own checks
    refused its inputs must not leave its peers waiting in the ring. One all-reduce of a few
    integers (max of x and of -x) compares them, so every rank reaches the same verdict."""
    rank = dist.get_rank(group)
    x = peer_signature(q, k, v, layout, causal, window, rejected=local_error is not None, rank=rank)
    both = torch.cat([x, -x]).to(collective_device(group))
    collective(dist.all_reduce, both, group, timeout,
               f"hf_striped ring attention{f' ({name})' if name else ''}: the shape agreement check",
               op=dist.ReduceOp.MAX)
    both = both.cpu()
    check_peer_spread(-both[len(x):], both[: len(x)], q, k, group, name, local_error)


class _RingAttention(torch.autograd.Function):
    """One rank's ring attention over a ``torch.distributed`` group (or alone for ``None``)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, group, layout, causal, scale, kernel, window, opts: _Opts):
        rank, world = group_rank_size(group)
        if opts.guard is not None:
            opts.guard.inputs("forward", q=q, k=k, v=v)
        q, k, v = _last_dim_contiguous(q), k.contiguous(), v.contiguous()
        gen = forward_schedule(
            q, k, v, rank=rank, world_size=world, layout=layout, causal=causal, scale=scale, kernel=kernel,
            window=window, guard=opts.guard,
        )
        out_acc, lse = _run(gen, group, opts, "forward")
        if opts.guard is not None:
            opts.guard.settle("forward", group, opts.timeout)
        if sinks is not None:
            # Backward with the sink-inclusive (out, lse) gives exact dq/dk/dv: every block's
            # probabilities exp(s - lse') are then the sink-inclusive softmax.
            out_acc, lse = _apply_sinks(out_acc, lse, sinks)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, _out_for_backward(kernel, out_acc, out), lse, sinks)
        ctx.args = (group, rank, world, layout, causal, scale, kernel, window, opts)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        group, rank, world, layout, causal, scale, kernel, window, opts = ctx.args
        dout = _last_dim_contiguous(dout)
        if opts.guard is not None:
            opts.guard.inputs("backward", **{"the output gradient": dout})
        gen = backward_schedule(
            dout, q, k, v, out, lse,
            rank=rank, world_size=world, layout=layout, causal=causal, scale=scale, kernel=kernel, window=window,
            guard=opts.guard,
        )
        dq, dk, dv = _run(gen, group, opts, "backward")
        if opts.guard is not None:
            opts.guard.settle("backward", group, opts.timeout)
        dsinks = _sinks_grad(dout, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dsinks, None, None, None, None, None, None, None


class _InProcessRingAttention(torch.autograd.Function):
    """P virtual ranks' ring attention in this process. Inputs are ``*qs, *ks, *vs``."""

    @staticmethod
    def forward(ctx, meta, *tensors):
        world, layout, causal, scale, kernel, stats, window, guards = meta
        qs, ks, vs = tensors[:world], tensors[world : 2 * world], tensors[2 * world :]
        for r, guard in enumerate(guards):
            guard.inputs("forward", q=qs[r], k=ks[r], v=vs[r])
        gens = [
            forward_schedule(
                qs[r], ks[r], vs[r], rank=r, world_size=world, layout=layout, causal=causal, scale=scale,
                kernel=kernel, window=window, guard=guards[r] if guards else None,
            )
            for r in range(world)
        ]
        results = run_inprocess(gens, stats)
        for guard in guards:
            guard.raise_if_found()
        outs = [o.to(q.dtype) for (o, _), q in zip(results, qs)]
        lses = [lse for _, lse in results]
        saved_outs = [_out_for_backward(kernel, o, out) for (o, _), out in zip(results, outs)]
        ctx.save_for_backward(*tensors, *saved_outs, *lses)
        ctx.meta = meta
        ctx.mark_non_differentiable(*lses)
        return (*outs, *lses)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        world, layout, causal, scale, kernel, stats, window, guards = ctx.meta
        saved = ctx.saved_tensors
        qs, ks, vs = saved[:world], saved[world : 2 * world], saved[2 * world : 3 * world]
        outs, lses = saved[3 * world : 4 * world], saved[4 * world :]
        douts = grads[:world]
        gens = [
            backward_schedule(
                _last_dim_contiguous(douts[r]) if douts[r] is not None else torch.zeros_like(outs[r]),
                qs[r], ks[r], vs[r], outs[r], lses[r],
                rank=r, world_size=world, layout=layout, causal=causal, scale=scale, kernel=kernel, window=window,
                guard=guards[r] if guards else None,
            )
            for r in range(world)
        ]
        results = run_inprocess(gens, stats)
        for guard in guards:
            guard.raise_if_found()
        dqs = [g[0] for g in results]
        dks = [g[1] for g in results]
        dvs = [g[2] for g in results]
        return (None, *dqs, *dks, *dvs)


_SOFTCAP_WARNED: set[str] = set()


def _softcap_kernel(softcap: float, backend: str) -> ReferenceKernel:
    """Soft-capping needs a kernel that caps scores before the softmax; of ours only the plain
    reference kernel does (it materialises each block's scores)."""
    if backend not in ("auto", "reference") and backend not in _SOFTCAP_WARNED:
        _SOFTCAP_WARNED.add(backend)
        warnings.warn(
            f"hf_striped: backend {backend!r} cannot soft-cap attention logits; using the 'reference' kernel",
            RuntimeWarning, stacklevel=4,
        )
    if "speed" not in _SOFTCAP_WARNED:
        _SOFTCAP_WARNED.add("speed")
        warnings.warn(
            "hf_striped: attention logit soft-capping runs on the plain PyTorch 'reference' kernel, which "
            "materialises every block's scores: exact, but much slower and hungrier than a fused kernel",
            RuntimeWarning, stacklevel=4,
        )
    return ReferenceKernel(softcap=softcap)


def _check_window(window, causal, kernel) -> None:
    """A sliding window needs causal attention; band calls run on a band-capable kernel (the
    reference kernel stands in for the others, with a one-time speed warning)."""
    if window is None:
        return
    if int(window) != window or window < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window!r}")
    if not causal:
        raise ValueError("a sliding window needs causal=True")
    if not getattr(kernel, "supports_band", False) and "window" not in _SOFTCAP_WARNED:
        _SOFTCAP_WARNED.add("window")
        warnings.warn(
            f"hf_striped: sliding-window band blocks run on the plain PyTorch 'reference' kernel where "
            f"{kernel.name!r} cannot mask a band (the triangular edge of each {BAND_ROWS}-row chunk of a band); "
            "full and causal pieces still use the fused kernel",
            RuntimeWarning, stacklevel=4,
        )


def _prepare(q, k, v, layout, softmax_scale, backend, softcap=None):
    check_layout(layout)
    _check_qkv(q, k, v)
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(
            f"the 'zigzag' layout gives every rank two equal chunks, so seq_local must be even; got "
            f"{q.shape[1]}. Shard with hf_striped.shard(..., layout='zigzag'), which checks the length."
        )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if softcap is not None:
        if not softcap > 0:
            raise ValueError(f"softcap must be positive, got {softcap}")
        return scale, _softcap_kernel(softcap, backend)
    return scale, select_kernel(backend, q, k, v)


def _check_sinks(sinks, q):
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != q.shape[2]):
        raise ValueError(f"sinks must be one logit per query head, shape [{q.shape[2]}]; got {tuple(sinks.shape)}")


def ring_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "striped",
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    timeout: float | None = None,
    check_finite: bool | None = None,
    name: str | None = None,
    train_step: int | None = None,
    check_peers: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ring_attention` that also returns the float32 log-sum-exp ``[batch, heads, seq_local]``
    of every local query row (not differentiable; it includes the sinks when given)."""
    rank, world = group_rank_size(group)
    timeout = resolve_timeout(timeout)
    local_error = None
    try:
        scale, kernel = _prepare(q, k, v, layout, softmax_scale, backend, softcap)
        _check_sinks(sinks, q)
        _check_window(window, causal, kernel)
    except (ValueError, TypeError, NotImplementedError) as exc:
        if world == 1 or not check_peers:
            raise
        local_error = exc  # raised below, after telling the peers (who would wait in the ring)
    if world > 1 and check_peers:
        _check_peers(q, k, v, group, layout, causal, window, timeout, name, local_error)
    guard = FiniteGuard(rank=rank, world_size=world, name=name, train_step=train_step) \
        if resolve_check_finite(check_finite) else None
    opts = _Opts(timeout, guard, name)
    return _RingAttention.apply(q, k, v, sinks, group, layout, causal, scale, kernel, window, opts)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "striped",
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    timeout: float | None = None,
    check_finite: bool | None = None,
    name: str | None = None,
    train_step: int | None = None,
    check_peers: bool = True,
) -> torch.Tensor:
    """Exact attention over a sequence split across the ranks of ``group``.

    Args:
        q: this rank's queries ``[batch, seq_local, heads, head_dim]``.
        k, v: this rank's keys/values ``[batch, seq_local, kv_heads, head_dim]``; ``kv_heads``
            may divide ``heads`` (grouped-query attention). They rotate around the ring
            un-repeated.
        group: the context-parallel process group. ``None`` or a group of size 1 means
            ordinary attention on this process.
        layout: how the sequence was split (see :func:`hf_striped.shard`): ``"striped"``,
            ``"contiguous"`` or ``"zigzag"``. It must match how q/k/v were sharded.
        causal: causal attention over *global* positions (the layout decides what that means
            locally); ``False`` attends to every token.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        backend: block kernel, ``"auto"`` or a name from ``hf_striped.kernels.BACKENDS``.
        softcap: Gemma 2 logit soft-capping (``cap * tanh(scores / cap)``); runs on the plain
            ``reference`` kernel (exact but slow; warns once).
        sinks: gpt-oss attention sinks ``[heads]``, one logit per query head that joins every
            row's softmax denominator and carries no value; differentiable (its gradient is
            this rank's part: all-reduce it over the group like any replicated parameter).
        window: causal sliding window of that many tokens in global positions (query at g sees
            keys g - window < g' <= g, Transformers' convention). Blocks wholly outside it are
            skipped; the triangular edges of band blocks run on the reference kernel (warns
            once), full and causal pieces on the fused one.
        timeout: seconds any rank waits for one ring message before raising
            :class:`hf_striped.core.guards.RingCommError` (naming the ring step and peer); default
            the ``HF_STRIPED_TIMEOUT`` environment variable, else 600. A dead peer fails at once.
        check_finite: check every block's output and log-sum-exp (and backward's gradient
            pieces) for NaN/Inf and raise :class:`hf_striped.core.guards.NonFiniteError` naming the
            layer, rank and step of the first; default the ``HF_STRIPED_CHECK_FINITE``
            environment variable, else off (it costs a pass over every block).
        name: what to call this call in error messages (e.g. ``"layer 5"``).
        train_step: the training step, for error messages.
        check_peers: compare shapes, dtype and settings across the group first (one all-reduce
            of a few integers; every rank raises the same ``ValueError`` on a mismatch). Callers
            that already checked (the model integration does, once per forward) pass ``False``.

    Returns:
        The attention output shaped like ``q``, in ``q.dtype``, differentiable in q, k, v.
    """
    return ring_attention_with_lse(
        q, k, v, group=group, layout=layout, causal=causal, softmax_scale=softmax_scale, backend=backend,
        softcap=softcap, sinks=sinks, window=window, timeout=timeout, check_finite=check_finite, name=name,
        train_step=train_step, check_peers=check_peers,
    )[0]


def ring_attention_inprocess(
    qs: list[torch.Tensor],
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    *,
    layout: str = "striped",
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    stats: list[CommStats] | None = None,
    softcap: float | None = None,
    window: int | None = None,
    check_finite: bool | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the same ring schedule for ``len(qs)`` virtual ranks in this process.

    ``qs[r]``/``ks[r]``/``vs[r]`` are rank r's shards (see :func:`hf_striped.core.layout.shard_local`).
    Returns ``(outs, lses)``, per rank; outputs are differentiable. ``stats``, if given (one
    :class:`CommStats` per rank), records every message each rank sends. ``softcap``, ``window``
    and ``check_finite`` as in :func:`ring_attention`.
    """
    world = len(qs)
    if not world or len(ks) != world or len(vs) != world:
        raise ValueError("qs, ks and vs must be non-empty lists of the same length (one entry per rank)")
    scale, kernel = _prepare(qs[0], ks[0], vs[0], layout, softmax_scale, backend, softcap)
    _check_window(window, causal, kernel)
    for q, k, v in zip(qs[1:], ks[1:], vs[1:]):  # rank 0's were checked by _prepare
        _check_qkv(q, k, v)
        if q.shape != qs[0].shape or k.shape != ks[0].shape:
            raise ValueError("every virtual rank must hold shards of the same shape")
    qs = [_last_dim_contiguous(q) for q in qs]
    ks = [k.contiguous() for k in ks]
    vs = [v.contiguous() for v in vs]
    guards = [FiniteGuard(rank=r, world_size=world, name=None, train_step=None) for r in range(world)] \
        if resolve_check_finite(check_finite) else []
    res = _InProcessRingAttention.apply((world, layout, causal, scale, kernel, stats, window, guards), *qs, *ks, *vs)
    return list(res[:world]), list(res[world:])
