"""Packed documents (``cu_seqlens``): the placement of every layout, the per-document block rule,
and ring attention exact against float64 attention run document by document (out, lse, dq, dk,
dv), in process and over real gloo groups."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dist_workers
import hf_striped
from exactness import Case, assert_exact
from hf_striped.core.documents import (
    check_cu_seqlens,
    placement,
    placement_blocks,
    places_documents,
    visible_blocks,
    shard_placed,
    unshard_placed,
)
from hf_striped.core.layout import LAYOUTS, shard_local, split_multiple, unshard_local
from hf_striped.core.ring import ring_attention_inprocess
from hf_striped.kernels.reference import ReferenceKernel, band_mask, plain_attention


def _bounds(lengths) -> tuple[int, ...]:
    out = [0]
    for length in lengths:
        out.append(out[-1] + length)
    return tuple(out)


def _shard(x, layout, rank, P, bounds):
    if places_documents(layout, P, bounds):
        return shard_placed(x, 1, layout, rank, P, bounds)
    return shard_local(x, 1, layout, rank, P)


def _unshard(parts, layout, bounds):
    if places_documents(layout, len(parts), bounds):
        return unshard_placed(parts, 1, layout, bounds)
    return unshard_local(parts, 1, layout)


def _dense(pl, rank, source, causal=True, window=None) -> torch.Tensor:
    """The [c, c] visibility the calls of the (rank, source) block compute, whatever ring step
    computes them (``visible_blocks``); every score at most once."""
    m = torch.zeros(pl.c, pl.c, dtype=torch.bool)
    for b in visible_blocks(pl, rank, source, causal, window):
        sub = m[b.q, b.k]
        vis = torch.ones_like(sub) if b.band is None else band_mask(*sub.shape, b.band)
        vis = vis.tril() if b.causal else vis
        assert not (sub & vis).any(), "a score computed twice"
        m[b.q, b.k] = sub | vis
    return m


def _check_placement(layout, P, lengths, window=None, causal=True):
    unit = split_multiple(layout, P)
    lengths = list(lengths)
    if sum(lengths) % unit:
        lengths.append(unit - sum(lengths) % unit)
    bounds, n = _bounds(lengths), sum(lengths)
    pl = placement(layout, P, n, bounds)
    idx = [pl.indices(r) for r in range(P)]
    assert sorted(torch.cat(idx).tolist()) == list(range(n)), "every token on exactly one rank"
    assert all(i.numel() == n // P for i in idx), "every rank holds N / P tokens"
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    for r in range(P):
        for s in range(P):
            gq, gk = idx[r][:, None], idx[s][None, :]
            expected = doc[gq] == doc[gk]
            if causal:
                expected &= gk <= gq
            if window:
                expected &= gk > gq - window
            assert torch.equal(_dense(pl, r, s, causal, window), expected), (layout, P, lengths, r, s)
            if s != r:  # keys past `travel` are never seen from another rank: messages leave them out
                assert not expected[:, pl.travel:].any()


@settings(max_examples=150, deadline=None)
@given(
    P=st.integers(1, 5),
    layout=st.sampled_from(LAYOUTS),
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=14),
    window=st.sampled_from([None, None, 1, 3, 7]),
)
def test_blocks_compute_exactly_each_documents_causal_set(P, layout, lengths, window):
    _check_placement(layout, P, lengths, window)


def test_blocks_without_causality_stay_inside_documents():
    _check_placement("striped", 3, [5, 1, 9, 2], causal=False)
    _check_placement("zigzag", 2, [3, 3, 6], causal=False)


def test_striped_places_short_documents_whole_and_splits_long_ones():
    P, c = 4, 64
    lengths = [200, 10, 9, 8, 7, 6, 5, 4, 3, 2] + [1] * 2  # one document longer than a rank's share
    bounds = _bounds(lengths)
    pl = placement("striped", P, P * c, bounds)
    by_doc: dict[int, list] = {}
    for r in range(P):
        for run in pl.runs[r]:
            by_doc.setdefault(run.doc, []).append((r, run))
    # the long one: 2P contiguous chunks of 25 tokens, head and tail on every rank, stored first
    assert sorted(r for r, _ in by_doc[0]) == sorted(list(range(P)) * 2)
    assert all(run.stride == 1 and run.length == 25 and run.local < 50 for _, run in by_doc[0])
    for r in range(P):
        head, tail = sorted(run.first for rr, run in by_doc[0] if rr == r)
        assert (head, tail) == (25 * r, 25 * (2 * P - 1 - r))
    whole = [d for d in range(1, len(lengths)) if len(by_doc[d]) == 1]
    assert len(whole) >= len(lengths) - 3, by_doc  # at most a couple split to fill ranks exactly
    assert pl.travel < c  # whole documents never travel
    assert placement("contiguous", P, P * c, bounds).travel == c


def test_split_documents_keep_every_rank_within_one_token():
    P = 3
    lengths = [301, 299, 97, 5]  # uneven 2P cuts
    pl = placement("striped", P, sum(lengths) + (-sum(lengths)) % P, _bounds(lengths + [(-sum(lengths)) % P] if sum(lengths) % P else lengths))
    split = [sum(run.length for run in pl.runs[r] if run.doc in (0, 1)) for r in range(P)]
    assert max(split) - min(split) <= 1, split


def test_documents_take_one_kernel_call_per_document_and_step():
    P, c = 4, 64
    lengths = [200, 20, 12, 10, 8, 6]  # one document split over every rank, one spilled
    pl = placement("striped", P, P * c, _bounds(lengths))
    for r in range(P):
        docs = [{run.doc for run in pl.runs[x]} for x in range(P)]
        diag = visible_blocks(pl, r, r, True)
        for run in pl.runs[r]:
            if sum(other.doc == run.doc for other in pl.runs[r]) == 1:  # a whole document, or one piece
                assert sum(b.q.start >= run.local and b.q.stop <= run.local + run.length for b in diag) == 1
        for s in range(P):
            if s != r:  # of each shared document, a source's head, or head and tail: one call
                assert len(placement_blocks(pl, r, s, True)) <= len(docs[r] & docs[s])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 700), min_size=2, max_size=8), head_tail=st.booleans())
def test_cost_model_prices_the_calls_placement_blocks_makes(sizes, head_tail):
    from hf_striped.core import documents as D

    P = len(sizes)
    runs = [[] for _ in range(P)]
    used = [0] * P
    if head_tail:
        D._place_head_tail(0, 0, sizes, runs, used)
    else:
        first = 0
        for r, size in enumerate(sizes):
            if size:
                runs[r].append(D.Run(0, size, first, 1, 0))
                first += size
    pl = D.Placement(P, max(sizes), tuple(tuple(x) for x in runs), max(sizes))
    table = (D._head_tail_steps if head_tail else D._contiguous_steps)(sizes)
    for r in range(P):
        for s in range(P):
            assert table[r][s] == pytest.approx(D._calls_cost(placement_blocks(pl, r, (r - s) % P, True)))


def test_a_row_of_short_documents_needs_no_ring_messages():
    P = 4
    lengths = [8] * 16  # 4 whole documents per rank
    pl = placement("striped", P, sum(lengths), _bounds(lengths))
    assert pl.travel == 0


@pytest.mark.parametrize("bad, match", [
    ([0, 5, 5, 8], "strictly increase"),
    ([0, 5, 7], "run from 0 to the packed row's length 8"),
    ([1, 8], "run from 0"),
    (torch.tensor([[0, 8]]), "1-d integer tensor"),
    (torch.tensor([0.0, 8.0]), "1-d integer tensor"),
])
def test_bad_cu_seqlens_say_what_to_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        check_cu_seqlens(bad if torch.is_tensor(bad) else torch.tensor(bad, dtype=torch.int32), 8)


def _doc_expected(case, bounds, window=None):
    """float64 reference and same-dtype plain attention, each document alone."""
    q, k, v, dout = case.inputs()
    kern = ReferenceKernel()
    ref = {n: [] for n in ("out", "lse", "dq", "dk", "dv")}
    base = {n: [] for n in ref}
    scale = q.shape[-1] ** -0.5
    band = None if window is None else (0, window - 1)
    for a, b in zip(bounds, bounds[1:]):
        qd, kd, vd, dd = (t[:, a:b].double() for t in (q, k, v, dout))
        out, lse = kern.forward(qd, kd, vd, True, scale, band=band)
        grads = kern.backward(dd, qd, kd, vd, out, lse, True, scale, band=band)
        for name, t in zip(ref, (out, lse, *grads)):
            ref[name].append(t)
        qp, kp, vp = (t[:, a:b].clone().requires_grad_() for t in (q, k, v))
        out_p, lse_p = plain_attention(qp, kp, vp, True, window=window)
        out_p.backward(dout[:, a:b])
        for name, t in zip(base, (out_p.detach(), lse_p.detach(), qp.grad, kp.grad, vp.grad)):
            base[name].append(t)
    cat = lambda d: {n: torch.cat(ts, dim=2 if n == "lse" else 1) for n, ts in d.items()}  # noqa: E731
    return cat(ref), cat(base)


def _ring_documents(case, P, layout, bounds, device="cpu", **kwargs) -> dict:
    q, k, v, dout = (t.to(device) for t in case.inputs())
    cu = torch.tensor(bounds, dtype=torch.int32)
    shards = [[_shard(t, layout, r, P, bounds).clone().requires_grad_() for r in range(P)] for t in (q, k, v)]
    outs, lses = ring_attention_inprocess(*shards, layout=layout, cu_seqlens=cu, **kwargs)
    torch.autograd.backward(outs, [_shard(dout, layout, r, P, bounds) for r in range(P)])
    lse = _unshard([x.transpose(1, 2) for x in lses], layout, bounds).transpose(1, 2)
    out = dict(out=_unshard([o.detach() for o in outs], layout, bounds), lse=lse,
               **{n: _unshard([t.grad for t in ts], layout, bounds) for n, ts in zip(("dq", "dk", "dv"), shards)})
    return {n: t.cpu() for n, t in out.items()}


MIXES = {
    "ones_and_twos": lambda n, P: [1, 2] * (n // 3) + [1] * (n % 3),
    "fewer_than_P": lambda n, P: [max(1, P - 1)] * (n // max(1, P - 1)) + [n % max(1, P - 1)],
    "exactly_P": lambda n, P: [P] * (n // P),
    "single": lambda n, P: [n],
    "many": lambda n, P: [n // 60] * 59 + [n - 59 * (n // 60)],
    "crossing": lambda n, P: [n // 3 + 1, n // 4 - 1, n - (n // 3 + 1) - (n // 4 - 1)],
}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_ring_with_documents_is_exact(P, layout, dtype, mix):
    n = 240 if mix == "many" else 24 * P
    lengths = [x for x in MIXES[mix](n, P) if x > 0]
    assert sum(lengths) == n
    bounds = _bounds(lengths)
    case = Case(batch=1, seq=n, heads=6, kv_heads=2, head_dim=33, dtype=dtype, seed=P)
    ours = _ring_documents(case, P, layout, bounds)
    ref, base = _doc_expected(case, bounds)
    assert_exact(f"P={P} {layout} {dtype} {mix} ({len(lengths)} documents)", ours, ref, base)


@settings(max_examples=25, deadline=None)
@given(
    P=st.integers(1, 4),
    layout=st.sampled_from(LAYOUTS),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=10),
    window=st.sampled_from([None, 2, 5]),
    seed=st.integers(0, 1000),
)
def test_random_document_mixes_with_windows_are_exact(P, layout, lengths, window, seed):
    unit = split_multiple(layout, P)
    if sum(lengths) % unit:
        lengths = [*lengths, unit - sum(lengths) % unit]
    bounds = _bounds(lengths)
    case = Case(batch=1, seq=sum(lengths), heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, seed=seed)
    ours = _ring_documents(case, P, layout, bounds, window=window, backend=random.Random(seed).choice(
        ["torch_cpu", "reference"]))
    ref, base = _doc_expected(case, bounds, window)
    assert_exact(f"P={P} {layout} window={window} {lengths}", ours, ref, base)


def test_documents_need_one_row():
    q = torch.randn(2, 8, 2, 8)
    with pytest.raises(ValueError, match="one packed row"):
        hf_striped.ring_attention(q, q, q, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [2, 3])
def test_ring_with_documents_over_gloo(dist_pool, P, layout):
    lengths = [1, 2, P, 3 * P + 1, 17, 5]
    unit = split_multiple(layout, P)
    lengths.append(unit - sum(lengths) % unit if sum(lengths) % unit else unit)
    bounds = _bounds(lengths)
    case = Case(batch=1, seq=sum(lengths), heads=6, kv_heads=2, head_dim=16, dtype=torch.float32, seed=3)
    per_rank = dist_pool(P).run(dist_workers.documents_case, case, layout, bounds)
    for r, res in enumerate(per_rank):  # unshard gave every rank the same full tensors
        for name in res:
            assert torch.equal(res[name], per_rank[0][name]), (r, name)
    ref, base = _doc_expected(case, bounds)
    assert_exact(f"gloo P={P} {layout} documents", per_rank[0], ref, base)


SUBSET_AND_LATER = [38, 93, 113, 26, 33, 14, 87]
"""At P = 4: one document split over two evenly spaced ranks, and whole documents computed at a
later ring step on their rank's own K/V (the placement these lengths get, checked below)."""


def _check_subset_and_later(pl, lengths):
    ranks = {d: sorted({r for r in range(4) for run in pl.runs[r] if run.doc == d}) for d in range(len(lengths))}
    pairs = [x for x in ranks.values() if len(x) == 2]
    assert pairs and all(x[1] - x[0] == 2 for x in pairs), ranks  # ranks a and a + P/2
    later = [(r, run) for r in range(4) for run, step in zip(pl.runs[r], pl.run_steps[r]) if step]
    assert later and all(len(ranks[run.doc]) == 1 and run.local >= 0 for _, run in later)  # only whole documents


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_over_some_ranks_and_later_whole_documents_are_exact(dtype):
    bounds = _bounds(SUBSET_AND_LATER)
    _check_subset_and_later(placement("striped", 4, bounds[-1], bounds), SUBSET_AND_LATER)
    case = Case(batch=1, seq=bounds[-1], heads=6, kv_heads=2, head_dim=16, dtype=dtype, seed=5)
    ours = _ring_documents(case, 4, "striped", bounds)
    ref, base = _doc_expected(case, bounds)
    assert_exact(f"P=4 subset split and later whole documents {dtype}", ours, ref, base)


def test_split_over_some_ranks_and_later_whole_documents_over_gloo(dist_pool):
    bounds = _bounds(SUBSET_AND_LATER)
    case = Case(batch=1, seq=bounds[-1], heads=6, kv_heads=2, head_dim=16, dtype=torch.float32, seed=6)
    per_rank = dist_pool(4).run(dist_workers.documents_case, case, "striped", bounds)
    ref, base = _doc_expected(case, bounds)
    assert_exact("gloo P=4 subset split and later whole documents", per_rank[0], ref, base)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "torch_flash", "torch_efficient", "torch_cudnn", "flash_attn"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_kernels_with_documents(backend, layout):
    """Packed documents through the CUDA kernels (one call per document part), bf16, P = 4,
    GQA 32/8 heads, head_dim 128. A named backend that cannot run these inputs is skipped."""
    from hf_striped.kernels import select_kernel

    P = 4
    lengths = [1, 3, 100, 17, 257, 60, 50]
    unit = split_multiple(layout, P)
    lengths.append(unit - sum(lengths) % unit if sum(lengths) % unit else unit)
    bounds = _bounds(lengths)
    case = Case(batch=1, seq=sum(lengths), heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    if backend != "auto":
        q, k, v, _ = (t.cuda() for t in case.inputs())
        try:
            select_kernel(backend, q, k, v)
        except (TypeError, ValueError) as exc:
            pytest.skip(f"{backend} cannot run here: {exc}")
    ours = _ring_documents(case, P, layout, bounds, device="cuda", backend=backend)
    ref, base = _doc_expected(case, bounds)
    assert_exact(f"cuda {backend} {layout} documents", ours, ref, base)
