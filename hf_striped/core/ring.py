"""Ring attention as differentiable functions: block kernel -> ``torch.autograd.Function`` ->
public function (the three layers flash-attention uses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..kernels import KernelChain, select_kernel
from ..log import warn_once
from .documents import Placement, check_cu_seqlens, placement, plain_placement
from .guards import FiniteGuard, Verdict, agree, checksum
from .layout import BAND_ROWS
from .options import RingOptions, build_options
from .schedule import RingPlan, Watch, backward_schedule, forward_schedule
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


def _out_for_backward(kernels: KernelChain, out_acc: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """What backward gets as the final output: the float32 accumulator for kernels whose
    half-precision backward runs in float32 (its row sums D = rowsum(dO * O) then use the
    unrounded output), else the output in the input dtype (no extra memory)."""
    return out_acc if kernels.capabilities.float32_backward else out


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


@dataclass(frozen=True)
class RingCall:
    """Everything one ring attention call needs besides its tensors, fixed before it starts."""

    options: RingOptions
    causal: bool
    scale: float
    kernels: KernelChain
    window: int | None = None
    softcap: float | None = None
    name: str | None = None
    train_step: int | None = None
    placement: Placement | None = None

    def watch(self, rank: int, world: int) -> Watch:
        """A fresh finite guard (when asked for) and the hooks for ``rank``'s schedule."""
        guard = FiniteGuard(rank=rank, world_size=world, name=self.name, train_step=self.train_step) \
            if self.options.check_finite else None
        return Watch(guard=guard, hooks=self.options.hooks, name=self.name)

    def plan(self, rank: int, world: int, watch: Watch) -> RingPlan:
        """``rank``'s :class:`RingPlan` for :func:`forward_schedule` / :func:`backward_schedule`."""
        return RingPlan(rank=rank, world_size=world, layout=self.options.layout, causal=self.causal, scale=self.scale,
                        kernels=self.kernels, window=self.window, softcap=self.softcap, watch=watch,
                        placement=self.placement)


def _run(gen, group, call: RingCall, phase: str):
    if group is None or dist.get_world_size(group) == 1:
        return run_inprocess([gen])[0]
    hooks = call.options.hooks
    return run_dist(gen, group, timeout=call.options.timeout, phase=phase, name=call.name,
                    on_wait=hooks.on_wait if hooks is not None else None)


_DTYPE_CODES = {dt: i for i, dt in enumerate((torch.float64, torch.float32, torch.bfloat16, torch.float16))}


def peer_signature(q, k, v, layout: str, causal: bool, window: int | None,
                   bounds: tuple[int, ...] | None = None) -> dict[str, int]:
    """What every rank of a CP group must agree on for its ring messages to match (q/k/v
    ``[b, c, h, d]``; ``bounds``: packed documents' boundaries), as the integer fields of
    :func:`hf_striped.core.guards.agree`."""
    return {"batch": q.shape[0], "tokens per rank": q.shape[1], "query heads": q.shape[2],
            "key/value heads": k.shape[2], "head_dim": q.shape[3], "value head_dim": v.shape[3],
            "dtype": _DTYPE_CODES.get(q.dtype, 99), "layout": ("striped", "contiguous", "zigzag").index(layout),
            "causal": int(causal), "window": window or 0, "document boundaries": bounds_checksum(bounds)}


def bounds_checksum(bounds: tuple[int, ...] | None) -> int:
    """A 62-bit summary of document boundaries, deterministic on every rank (not Python's
    salted ``hash``): ranks given different ``cu_seqlens`` disagree on it."""
    return 0 if bounds is None else checksum(repr(bounds))


def _where(name: str | None) -> str:
    return f"hf_striped ring attention{f' ({name})' if name else ''}"


def rejected_by_peer(name: str | None):
    """The error a rank raises when CP rank ``r`` of its group refused its own inputs."""
    return lambda r: ValueError(
        f"{_where(name)}: CP rank {r} of the group rejected its inputs (its error says why and how to fix them), "
        "so this rank stops too instead of waiting for it in the ring"
    )


def check_peer_spread(verdict: Verdict, q, k, group, name: str | None) -> None:
    """Raise if the ranks' :func:`peer_signature` fields differ (every rank sees the same
    ``verdict``, so every rank raises together)."""
    differ = [f for f in verdict.differing() if f in _SIGNATURE_FIELDS]
    if not differ:
        return
    dtypes = {v: k for k, v in _DTYPE_CODES.items()}
    text = [f"dtype differs ({', '.join(str(dtypes.get(c, 'other')) for c in (verdict.lo[f], verdict.hi[f]))})"
            if f == "dtype" else f"{_SIGNATURE_NAMES[f]} differ" if f in _SIGNATURE_NAMES
            else f"{f} ranges {verdict.lo[f]}..{verdict.hi[f]}" for f in differ]
    raise ValueError(
        f"{_where(name)}: the ranks of the CP group called it with different "
        f"inputs ({'; '.join(text)}; this is CP rank {dist.get_rank(group)}: batch {q.shape[0]}, {q.shape[1]} tokens, "
        f"{q.shape[2]}/{k.shape[2]} heads, head_dim {q.shape[3]}, {q.dtype}). Every rank must hold its shard of the "
        "same global batch: shard it with hf_striped.shard (or the StripingCollator) with the same layout on every "
        "rank, and load the same model config and dtype everywhere."
    )


_SIGNATURE_FIELDS = tuple(peer_signature(*(torch.empty(1, 1, 1, 1),) * 3, "striped", True, None))
_SIGNATURE_NAMES = {"document boundaries": "document boundaries (cu_seqlens)"}


def _check_peers(q, k, v, group, options: RingOptions, causal: bool, window: int | None, name: str | None,
                 local_error: BaseException | None, bounds: tuple[int, ...] | None = None) -> None:
    """Every rank of ``group`` must call the ring with the same shapes and settings, or the
    messages it exchanges would not match (a hang, or garbage); and a rank whose own checks
    refused its inputs must not leave its peers waiting in the ring. One :func:`agree`."""
    verdict = agree(group, peer_signature(q, k, v, options.layout, causal, window, bounds),
                    what=f"{_where(name)}: the shape agreement check", timeout=options.timeout,
                    error=local_error, peer_error=rejected_by_peer(name))
    check_peer_spread(verdict, q, k, group, name)


class _RingAttention(torch.autograd.Function):
    """One rank's ring attention over a ``torch.distributed`` group (or alone for ``None``)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, group, call: RingCall):
        rank, world = group_rank_size(group)
        watch = call.watch(rank, world)
        if watch.guard is not None:
            watch.guard.inputs("forward", q=q, k=k, v=v)
        q, k, v = _last_dim_contiguous(q), k.contiguous(), v.contiguous()
        out_acc, lse = _run(forward_schedule(q, k, v, call.plan(rank, world, watch)), group, call, "forward")
        if watch.guard is not None:
            watch.guard.settle("forward", group, call.options.timeout)
        if sinks is not None:
            # Backward with the sink-inclusive (out, lse) gives exact dq/dk/dv: every block's
            # probabilities exp(s - lse') are then the sink-inclusive softmax.
            out_acc, lse = _apply_sinks(out_acc, lse, sinks)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, _out_for_backward(call.kernels, out_acc, out), lse, sinks)
        ctx.group, ctx.call = group, call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        group, call = ctx.group, ctx.call
        rank, world = group_rank_size(group)
        watch = call.watch(rank, world)
        dout = _last_dim_contiguous(dout)
        if watch.guard is not None:
            watch.guard.inputs("backward", **{"the output gradient": dout})
        gen = backward_schedule(dout, q, k, v, out, lse, call.plan(rank, world, watch))
        dq, dk, dv = _run(gen, group, call, "backward")
        if watch.guard is not None:
            watch.guard.settle("backward", group, call.options.timeout)
        dsinks = _sinks_grad(dout, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dsinks, None, None


class _InProcessRingAttention(torch.autograd.Function):
    """P virtual ranks' ring attention in this process. Inputs are ``*qs, *ks, *vs``."""

    @staticmethod
    def forward(ctx, call: RingCall, stats, *tensors):
        world = len(tensors) // 3
        qs, ks, vs = tensors[:world], tensors[world : 2 * world], tensors[2 * world :]
        watches = [call.watch(r, world) for r in range(world)]
        for r, w in enumerate(watches):
            if w.guard is not None:
                w.guard.inputs("forward", q=qs[r], k=ks[r], v=vs[r])
        gens = [forward_schedule(qs[r], ks[r], vs[r], call.plan(r, world, watches[r])) for r in range(world)]
        results = run_inprocess(gens, stats)
        _raise_findings(watches)
        outs = [o.to(q.dtype) for (o, _), q in zip(results, qs)]
        lses = [lse for _, lse in results]
        saved_outs = [_out_for_backward(call.kernels, o, out) for (o, _), out in zip(results, outs)]
        ctx.save_for_backward(*tensors, *saved_outs, *lses)
        ctx.call, ctx.stats, ctx.world = call, stats, world
        ctx.mark_non_differentiable(*lses)
        return (*outs, *lses)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        call, world, saved = ctx.call, ctx.world, ctx.saved_tensors
        qs, ks, vs = saved[:world], saved[world : 2 * world], saved[2 * world : 3 * world]
        outs, lses = saved[3 * world : 4 * world], saved[4 * world :]
        douts = [_last_dim_contiguous(g) if g is not None else torch.zeros_like(o) for g, o in zip(grads[:world], outs)]
        watches = [call.watch(r, world) for r in range(world)]
        gens = [backward_schedule(douts[r], qs[r], ks[r], vs[r], outs[r], lses[r],
                                  call.plan(r, world, watches[r])) for r in range(world)]
        results = run_inprocess(gens, ctx.stats)
        _raise_findings(watches)
        return (None, None, *[g[0] for g in results], *[g[1] for g in results], *[g[2] for g in results])


def _raise_findings(watches: list[Watch]) -> None:
    for w in watches:
        if w.guard is not None:
            w.guard.raise_if_found()


def _kernels_for(options: RingOptions, softcap: float | None, window: int | None, q, k, v) -> KernelChain:
    """The call's kernel chain; with soft-capping, from its first kernel that can soft-cap (the
    plain reference kernel: exact, but it materialises every block's scores, so it warns once)."""
    chain = select_kernel(options.backend, q, k, v)
    if softcap is not None:
        if options.backend not in ("auto", "reference"):
            warn_once(f"hf_striped: backend {options.backend!r} cannot soft-cap attention logits; using the "
                      "'reference' kernel", stacklevel=4)
        warn_once("hf_striped: attention logit soft-capping runs on the plain PyTorch 'reference' kernel, which "
                  "materialises every block's scores: exact, but much slower and hungrier than a fused kernel",
                  stacklevel=4)
        chain = chain.starting_with("softcap")
    if window is not None and not chain.capabilities.band:
        warn_once(f"hf_striped: sliding-window band blocks run on the plain PyTorch 'reference' kernel where "
                  f"{chain.name!r} cannot mask a band (the triangular edge of each {BAND_ROWS}-row chunk of a band); "
                  "full and causal pieces still use the fused kernel", stacklevel=4)
    return chain


def _check_window(window, causal) -> None:
    if window is None:
        return
    if int(window) != window or window < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window!r}")
    if not causal:
        raise ValueError("a sliding window needs causal=True")


def _prepare(q, k, v, options: RingOptions, *, causal: bool, softmax_scale, softcap, window, sinks=None,
             name=None, train_step=None, world: int = 1, bounds: tuple[int, ...] | None = None,
             place_documents: bool = True) -> RingCall:
    """Check one rank's inputs and fix the call's settings (raises what is wrong with them).
    ``bounds``: validated document boundaries of the packed row (``None``: no documents)."""
    _check_qkv(q, k, v)
    if bounds is not None and q.shape[0] != 1:
        raise ValueError(
            f"cu_seqlens describes one packed row (batch 1, the padding-free format); got a batch of {q.shape[0]} "
            "rows: concatenate them into one row (DataCollatorWithFlattening does) or pass no cu_seqlens"
        )
    if options.layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(
            f"the 'zigzag' layout gives every rank two equal chunks, so seq_local must be even; got "
            f"{q.shape[1]}. Shard with hf_striped.shard(..., layout='zigzag'), which checks the length."
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    _check_sinks(sinks, q)
    _check_window(window, causal)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    where = placement if place_documents else plain_placement
    pl = None if bounds is None else where(options.layout, world, q.shape[1] * world, bounds)
    return RingCall(options=options, causal=causal, scale=scale, kernels=_kernels_for(options, softcap, window, q, k, v),
                    window=window, softcap=softcap, name=name, train_step=train_step, placement=pl)


def _check_sinks(sinks, q):
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != q.shape[2]):
        raise ValueError(f"sinks must be one logit per query head, shape [{q.shape[2]}]; got {tuple(sinks.shape)}")


def ring_attention_call(q, k, v, *, group, options: RingOptions, causal: bool = True, softmax_scale=None,
                        softcap=None, sinks=None, window=None, name=None, train_step=None,
                        check_peers: bool = True, cu_seqlens=None,
                        place_documents: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ring_attention_with_lse` with already validated ``options`` (the entry points
    build them; the model integration calls this once per layer). ``cu_seqlens``: a tensor or a
    tuple of boundaries; ``place_documents=False``: the tokens lie at the layout's own positions
    (sharded without ``cu_seqlens``), not where its document placement puts them."""
    rank, world = group_rank_size(group)
    local_error = call = bounds = None
    try:
        bounds = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q.shape[1] * world)
        call = _prepare(q, k, v, options, causal=causal, softmax_scale=softmax_scale, softcap=softcap, window=window,
                        sinks=sinks, name=name, train_step=train_step, world=world, bounds=bounds,
                        place_documents=place_documents)
    except (ValueError, TypeError, NotImplementedError) as exc:
        if world == 1 or not check_peers:
            raise
        local_error = exc  # raised by the agreement check, after telling the peers (who would wait in the ring)
    if world > 1 and check_peers:
        _check_peers(q, k, v, group, options, causal, window, name, local_error, bounds)
    return _RingAttention.apply(q, k, v, sinks, group, call)


def ring_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ring_attention` (same keywords) that also returns the float32 log-sum-exp
    ``[batch, heads, seq_local]`` of every local query row (not differentiable; it includes the
    sinks when given)."""
    return ring_attention(q, k, v, return_lse=True, **kwargs)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    timeout: float | None = None,
    check_finite: bool | None = None,
    name: str | None = None,
    train_step: int | None = None,
    check_peers: bool = True,
    options: RingOptions | None = None,
    return_lse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        timeout, check_finite: the deadline of every wait and the NaN/Inf guard, as the fields
            of :class:`hf_striped.RingOptions` (which also give ``layout`` and ``backend`` their
            defaults).
        name: what to call this call in error messages (e.g. ``"layer 5"``).
        train_step: the training step, for error messages.
        check_peers: compare shapes, dtype and settings across the group first (one all-reduce
            of a few integers; every rank raises the same ``ValueError`` on a mismatch). Callers
            that already checked (the model integration does, once per forward) pass ``False``.

        options: a :class:`hf_striped.RingOptions` carrying layout, backend, timeout,
            check_finite (and test hooks) at once; then leave those four keywords unset.
        return_lse: also return the float32 log-sum-exp (see :func:`ring_attention_with_lse`).
        cu_seqlens: packed documents: the int32 1-d boundaries ``[0, l1, l1 + l2, ..., N]`` of
            the documents of one padding-free row (batch 1), the same on every rank; a query
            then attends (causally) to keys of its own document only. q/k/v must be sharded
            with the same ``cu_seqlens`` (:func:`hf_striped.shard`), which for ``"striped"``
            places short documents whole on one rank (``hf_striped.core.documents``). Any
            document lengths; only ``N`` must be a multiple of the layout's unit.

    Returns:
        The attention output shaped like ``q``, in ``q.dtype``, differentiable in q, k, v.
    """
    options = build_options(options, layout=layout, backend=backend, timeout=timeout, check_finite=check_finite)
    out, lse = ring_attention_call(q, k, v, group=group, options=options, causal=causal, softmax_scale=softmax_scale,
                                   softcap=softcap, sinks=sinks, window=window, name=name, train_step=train_step,
                                   check_peers=check_peers, cu_seqlens=cu_seqlens)
    return (out, lse) if return_lse else out


def ring_attention_inprocess(
    qs: list[torch.Tensor],
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    *,
    layout: str | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str | None = None,
    stats: list[CommStats] | None = None,
    softcap: float | None = None,
    window: int | None = None,
    check_finite: bool | None = None,
    options: RingOptions | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the same ring schedule for ``len(qs)`` virtual ranks in this process.

    ``qs[r]``/``ks[r]``/``vs[r]`` are rank r's shards (see :func:`hf_striped.core.layout.shard_local`).
    Returns ``(outs, lses)``, per rank; outputs are differentiable. ``stats``, if given (one
    :class:`CommStats` per rank), records every message each rank sends. The other keywords as
    in :func:`ring_attention` (``timeout`` does not apply: nothing waits).
    """
    world = len(qs)
    if not world or len(ks) != world or len(vs) != world:
        raise ValueError("qs, ks and vs must be non-empty lists of the same length (one entry per rank)")
    options = build_options(options, layout=layout, backend=backend, check_finite=check_finite)
    bounds = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, qs[0].shape[1] * world)
    call = _prepare(qs[0], ks[0], vs[0], options, causal=causal, softmax_scale=softmax_scale, softcap=softcap,
                    window=window, world=world, bounds=bounds)
    for q, k, v in zip(qs[1:], ks[1:], vs[1:]):  # rank 0's were checked by _prepare
        _check_qkv(q, k, v)
        if q.shape != qs[0].shape or k.shape != ks[0].shape:
            raise ValueError("every virtual rank must hold shards of the same shape")
    qs = [_last_dim_contiguous(q) for q in qs]
    ks = [k.contiguous() for k in ks]
    vs = [v.contiguous() for v in vs]
    res = _InProcessRingAttention.apply(call, stats, *qs, *ks, *vs)
    return list(res[:world]), list(res[world:])
