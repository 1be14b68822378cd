"""Functions run on every rank of a gloo pool (see dist_pool.py). Module-level so they pickle."""

from __future__ import annotations


import torch
import torch.distributed as dist

import hf_striped
from hf_striped.tools.memory import LiveBytes
from hf_striped.core.layout import unshard_local
from hf_striped.core.ring import ring_attention_with_lse


def ring_case(rank, world, case, layout, backend="auto"):
    """Shard the case's full inputs, run ring attention forward + backward over WORLD, and
    return this rank's (out, lse, dq, dk, dv)."""
    return ring_case_in_group(case, layout, dist.group.WORLD, backend)


def _load(model_dir, dtype, attn="striped_ring"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=dtype)
    model.train()  # dropout is 0 in these configs; train mode checks nothing is eval-only
    return model


def model_case(rank, world, model_dir, input_ids, layout, dtype=torch.float32, want_grads=True,
               checkpointing=None, backward="inside"):
    """Run a causal LM on this rank's shard inside ``context_parallel``; return this rank's logits
    and per-token losses, and (rank 0) the CP-group-summed parameter gradients of the summed loss.

    ``checkpointing``: None, "reentrant" or "non_reentrant" gradient checkpointing.
    ``backward``: run it "inside" the context block, "outside" (after it), or "thread" (inside,
    but on another thread, as autograd's CUDA device threads do; they see no context variable)."""
    import threading

    group = dist.group.WORLD
    model = _load(model_dir, dtype)
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    b, n = input_ids.shape
    positions = torch.arange(n).expand(b, -1)
    shift_labels = torch.cat([input_ids[:, 1:], torch.full((b, 1), -100)], dim=1)  # shifted once, globally
    ids, pos, labels = (hf_striped.shard(t, dim=1, group=group, layout=layout) for t in (input_ids, positions, shift_labels))
    with hf_striped.context_parallel(group, layout=layout):
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        token_loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
        ).view(b, -1)
        if want_grads and backward == "inside":
            token_loss.sum().backward()
        if want_grads and backward == "thread":
            errors = []

            def run():
                try:
                    token_loss.sum().backward()
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    errors.append(exc)

            t = threading.Thread(target=run)
            t.start()
            t.join()
            if errors:
                raise errors[0]
    if want_grads and backward == "outside":
        token_loss.sum().backward()
    result = dict(logits=logits.detach(), token_loss=token_loss.detach())
    if want_grads:
        _add_group_grads(result, model, group, rank)
    return result


def _add_group_grads(result: dict, model, group, rank: int) -> None:
    """Sum every parameter's gradient over the CP group; rank 0 reports them in ``result``."""
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g, group=group)
    if rank == 0:
        result["grads"] = grads


def missing_positions(rank, world, model_dir, input_ids, layout):
    """Call the model inside the context without position_ids; return the error text."""
    group = dist.group.WORLD
    model = _load(model_dir, torch.float32)
    ids = hf_striped.shard(input_ids, dim=1, group=group, layout=layout)
    try:
        with hf_striped.context_parallel(group, layout=layout):
            model(input_ids=ids, use_cache=False)
    except ValueError as exc:
        return str(exc)
    return None


def shard_unshard(rank, world, x, layout):
    """shard -> unshard round trip, and the gradient of unshard: every rank's copy of the full
    tensor gets loss weights (rank + 1) * w, so the part's gradient is sum_r (r + 1) * w."""
    group = dist.group.WORLD
    part = hf_striped.shard(x, dim=1, group=group, layout=layout).clone().requires_grad_()
    full = hf_striped.unshard(part, dim=1, group=group, layout=layout)
    w = torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape) / x.numel()
    (full * w * (rank + 1)).sum().backward()
    return dict(full=full.detach(), grad=part.grad)


class _CommSpy:
    """Records every torch.distributed call the ring makes on this rank."""

    GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_object", "gather", "broadcast",
               "all_to_all", "all_to_all_single", "all_reduce", "reduce_scatter", "reduce_scatter_tensor")

    def __init__(self):
        self.collectives: list[tuple[str, int]] = []  # (name, elements of its tensor argument)
        self.p2p_numels: list[int] = []
        self._saved = {}

    def __enter__(self):
        for name in self.GATHERS:
            orig = getattr(dist, name)
            self._saved[name] = orig

            def wrapped(*a, __name=name, __orig=orig, **k):
                tensor = next((x for x in (*a, *k.values()) if isinstance(x, torch.Tensor)), None)
                self.collectives.append((__name, -1 if tensor is None else tensor.numel()))
                return __orig(*a, **k)

            setattr(dist, name, wrapped)
        orig_batch = dist.batch_isend_irecv
        self._saved["batch_isend_irecv"] = orig_batch

        def batch(ops):
            self.p2p_numels.extend(op.tensor.numel() for op in ops)
            return orig_batch(ops)

        dist.batch_isend_irecv = batch
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def ring_memory(rank, world, case, layout):
    """Forward + backward of ring attention while recording (a) every collective and P2P message
    and (b) the peak of tensor bytes allocated during the op and alive at once."""
    q, k, v, dout = case.inputs()
    group = dist.group.WORLD
    ql, kl, vl, dl = (hf_striped.shard(t, dim=1, group=group, layout=layout).clone() for t in (q, k, v, dout))
    for t in (ql, kl, vl):
        t.requires_grad_()
    with _CommSpy() as spy, LiveBytes() as mem:
        # the production default: no NaN/Inf guard (the rest of the suite runs with it on)
        out = hf_striped.ring_attention(ql, kl, vl, group=group, layout=layout, check_finite=False)
        out.backward(dl)
        del out
    return dict(
        collectives=spy.collectives,
        p2p_numels=spy.p2p_numels,
        peak_bytes=mem.peak,
        local_q_bytes=ql.numel() * ql.element_size(),
        local_kv_numel=kl.numel(),
        full_kv_bytes=2 * k.numel() * k.element_size(),
    )


def subgroup_rings(rank, world, cases, layout, partition):
    """Data-parallel x context-parallel: split WORLD into CP groups (``partition``, a list of rank
    lists, e.g. [[0, 2], [1, 3]]), run a different case in each group, return this rank's
    results with its group index and rank in the group."""
    groups = [dist.new_group(ranks) for ranks in partition]  # every rank creates every group
    gi = next(i for i, ranks in enumerate(partition) if rank in ranks)
    group = groups[gi]
    res = ring_case_in_group(cases[gi], layout, group)
    res["group_index"], res["group_rank"] = gi, dist.get_rank(group)
    return res


def ring_case_in_group(case, layout, group, backend="auto"):
    q, k, v, dout = case.inputs()
    ql, kl, vl, dl = (hf_striped.shard(t, dim=1, group=group, layout=layout).clone() for t in (q, k, v, dout))
    for t in (ql, kl, vl):
        t.requires_grad_()
    out, lse = ring_attention_with_lse(ql, kl, vl, group=group, layout=layout, backend=backend)
    out.backward(dl)
    return dict(out=out.detach(), lse=lse, dq=ql.grad, dk=kl.grad, dv=vl.grad)


def reused_positions(rank, world, model_dir, input_ids):
    """Two forwards; rank 0 reuses its position tensor, rank 1 passes an equal copy. Whether the
    position check (a collective) runs must not differ between ranks, or they deadlock."""
    group = dist.group.WORLD
    model = _load(model_dir, torch.float32).eval()
    ids = hf_striped.shard(input_ids, dim=1, group=group)
    pos = hf_striped.shard(torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1), dim=1, group=group)
    with torch.no_grad(), hf_striped.context_parallel(group):
        first = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        second = model(input_ids=ids, position_ids=pos if rank == 0 else pos.clone(), use_cache=False).logits
    return torch.equal(first, second)


def ring_feature_cases(rank, world, items):
    """Each ``(q, k, v, dout, layout, options)`` through ``ring_attention_with_lse`` over WORLD
    (``world == 1``: no process group), ``options`` being its ``softcap``, ``window`` and
    ``sinks`` (a tensor, made a leaf here). Returns this rank's out, lse, dq, dk, dv (+ dsinks)."""
    import warnings

    warnings.simplefilter("ignore", RuntimeWarning)  # the reference kernel's speed warnings
    group = dist.group.WORLD if world > 1 else None
    results = []
    for q, k, v, dout, layout, options in items:
        ql, kl, vl, dl = (hf_striped.shard(t, dim=1, group=group, layout=layout).clone() for t in (q, k, v, dout))
        for t in (ql, kl, vl):
            t.requires_grad_()
        sinks = options.get("sinks")
        sinks = sinks.clone().requires_grad_() if sinks is not None else None
        out, lse = ring_attention_with_lse(ql, kl, vl, group=group, layout=layout, window=options.get("window"),
                                           softcap=options.get("softcap"), sinks=sinks)
        out.backward(dl)
        res = dict(out=out.detach(), lse=lse, dq=ql.grad, dk=kl.grad, dv=vl.grad)
        if sinks is not None:
            res["dsinks"] = sinks.grad
        results.append(res)
    return results


def unshard_feature_results(per_rank, i, layout, with_sinks):
    """Item ``i`` of :func:`ring_feature_cases` on every rank, in natural order, and the names
    to compare (the sinks are a replicated parameter: their gradient is the sum over ranks)."""
    ours = {name: unshard_local([r[i][name] for r in per_rank], 1, layout) for name in ("out", "dq", "dk", "dv")}
    ours["lse"] = unshard_local([r[i]["lse"] for r in per_rank], 2, layout)
    names = ["out", "lse", "dq", "dk", "dv"]
    if with_sinks:
        ours["dsinks"] = sum(r[i]["dsinks"].double() for r in per_rank)
        names.append("dsinks")
    return ours, names


def agreement(rank, world, case):
    """One call of ``hf_striped.core.guards.agree`` on a real group, counting its collectives.
    ``case``: "same" (equal fields), "differ" (rank 1's "b" differs) or "refuse" (rank 1 passes an
    error). Returns what the rank got: ("verdict", lo, hi) or (exception name, message)."""
    from hf_striped.core.guards import agree

    fields = {"a": 7, "b": 100 + (rank == 1 and case == "differ")}
    error = ValueError("rank 1 refuses its inputs") if rank == 1 and case == "refuse" else None
    with _CommSpy() as spy:
        try:
            verdict = agree(dist.group.WORLD, fields, what="the test's agreement", timeout=30, error=error,
                            peer_error=lambda r: RuntimeError(f"peer {r} refused"))
            got = ("verdict", verdict.lo, verdict.hi, verdict.differing())
        except Exception as exc:  # noqa: BLE001 - reported to the test
            got = (type(exc).__name__, str(exc))
    return got, spy.collectives


def documents_case(rank, world, case, layout, bounds):
    """Ring attention over a packed row of documents on a real group: shard with the documents'
    ``cu_seqlens``, forward + backward, and every result unsharded back to natural order."""
    group = dist.group.WORLD
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k, v, dout = case.inputs()
    parts = [hf_striped.shard(t, dim=1, group=group, layout=layout, cu_seqlens=cu).clone().requires_grad_()
             for t in (q, k, v)]
    out, lse = ring_attention_with_lse(*parts, group=group, layout=layout, cu_seqlens=cu, timeout=60)
    out.backward(hf_striped.shard(dout, dim=1, group=group, layout=layout, cu_seqlens=cu))
    full = lambda x: hf_striped.unshard(x, dim=1, group=group, layout=layout, cu_seqlens=cu)  # noqa: E731
    return dict(out=full(out.detach()), lse=full(lse.transpose(1, 2)).transpose(1, 2),
                dq=full(parts[0].grad), dk=full(parts[1].grad), dv=full(parts[2].grad))


def packed_model_case(rank, world, model_dir, documents, layout, dtype=torch.float32, mode="collator"):
    """A causal LM on one padding-free row of ``documents`` (token id lists) made by Transformers'
    ``DataCollatorWithFlattening``, under CP over the whole world. ``mode``: ``"collator"`` (hf_striped's
    collator on top of it: the row is placed by its documents and carries ``cu_seq_lens_q``) or
    ``"shard"`` (the flattened row sharded with ``hf_striped.shard`` alone: hf_striped finds the
    documents from the positions). Returns the full logits and per-token losses (natural order)
    and (rank 0) the CP-group-summed gradients of the summed loss."""
    from transformers import DataCollatorWithFlattening

    group = dist.group.WORLD
    model = _load(model_dir, dtype)
    features = [{"input_ids": d} for d in documents]
    if mode == "collator":
        cp = hf_striped.ContextParallel(world, layout=layout)
        batch = cp.check_batch(cp.collator(pad_token_id=0, base_collator=DataCollatorWithFlattening())(features))
        cu = batch["cu_seq_lens_q"]
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    else:
        flat = DataCollatorWithFlattening(return_tensors="pt")(features)
        n = flat["input_ids"].shape[1]
        pad = -n % (2 * world if layout == "zigzag" else world)  # the padding: its own last document
        ids = torch.cat([flat["input_ids"], torch.zeros(1, pad, dtype=torch.long)], 1)
        pos = torch.cat([flat["position_ids"], torch.arange(pad)[None]], 1)
        labels = torch.cat([flat["labels"], torch.full((1, pad), -100)], 1)
        shift = torch.cat([labels[:, 1:], torch.full((1, 1), -100)], 1)
        batch = {k: hf_striped.shard(t, dim=1, group=group, layout=layout)
                 for k, t in (("input_ids", ids), ("position_ids", pos), ("shift_labels", shift))}
        cu, kwargs = None, {}
    with hf_striped.context_parallel(group, layout=layout):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **kwargs).logits
    token_loss = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100, reduction="none")[None]
    token_loss.sum().backward()
    full = lambda x: hf_striped.unshard(x, dim=1, group=group, layout=layout, cu_seqlens=cu)  # noqa: E731
    result = dict(logits=full(logits.detach()), token_loss=full(token_loss.detach()))
    _add_group_grads(result, model, group, rank)
    return result
