"""Sliding windows under striping (and the other layouts): a window of w tokens in global
positions is a band of local diagonals in every (rank, source) block. The block decomposition
must cover exactly the windowed causal set, each score once, and skip blocks wholly outside the
window; the ring must then be exact (out, lse, dq, dk, dv within the rule against float64
plain attention with the same window), in-process and on real gloo groups."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import hf_striped
from dist_workers import ring_feature_cases, unshard_feature_results
from exactness import Case, assert_exact
from hf_striped.kernels.reference import band_mask, plain_attention
from hf_striped.core.layout import LAYOUTS, blocks, global_indices, shard_local, unshard_local
from hf_striped.core.ring import ring_attention_inprocess

pytestmark = pytest.mark.filterwarnings("ignore:hf_striped. sliding-window band blocks:RuntimeWarning")


def _coverage(layout, rank, source, P, c, window, split=0) -> torch.Tensor:
    """How many times the block decomposition computes each (query, key) score."""
    count = torch.zeros(c, c, dtype=torch.int)
    for b in blocks(layout, rank, source, P, c, True, split=split, window=window):
        for qs, ks in b.pieces(c):
            sub = count[qs, ks]
            m, n = sub.shape
            band = b.band if b.band is not None else (0, m) if b.causal else (-n, m)
            vis = band_mask(m, n, band)  # (tril is oddly slow on tiny tensors under CPU contention)
            count[qs, ks] += vis.int()
    return count


@pytest.mark.parametrize("band_rows", [64, 3])
def test_window_blocks_cover_the_windowed_causal_set_exactly_once(monkeypatch, band_rows):
    """band_rows=3 cuts bands into row chunks (triangle, full and causal calls) at these sizes."""
    import hf_striped.core.layout

    monkeypatch.setattr(hf_striped.core.layout, "BAND_ROWS", band_rows)
    checked = 0
    for layout in LAYOUTS:
        for P in (1, 2, 3, 4, 5):
            for c in ((2, 4, 6, 10) if layout == "zigzag" else (1, 2, 3, 5, 8)):
                n = P * c
                for w in range(1, n + 2):
                    for r, s in itertools.product(range(P), repeat=2):
                        gi, gj = global_indices(layout, r, P, n), global_indices(layout, s, P, n)
                        d = gi[:, None] - gj[None, :]
                        want = ((d >= 0) & (d < w)).int()
                        for split in (0, 2) if layout == "striped" else (0,):
                            got = _coverage(layout, r, s, P, c, w, split)
                            assert torch.equal(got, want), (layout, P, c, w, r, s, split)
                        checked += 1
    assert checked > 10000


def test_blocks_wholly_outside_the_window_are_skipped():
    """Contiguous, window <= c: rank r only needs its own chunk and the previous one."""
    P, c, w = 4, 8, 5
    for r, s in itertools.product(range(P), repeat=2):
        calls = blocks("contiguous", r, s, P, c, True, window=w)
        assert bool(calls) == (s in (r, r - 1)), (r, s, calls)
    # striped, window < P: a query sees only keys on the w - 1 ranks just before it (and its own)
    P, c, w = 4, 6, 2
    for r, s in itertools.product(range(P), repeat=2):
        gap = (r - s) % P
        assert bool(blocks("striped", r, s, P, c, True, window=w)) == (gap < w), (r, s)


def test_window_arguments_are_validated():
    q, k, v, _ = Case(batch=1, seq=8).inputs()
    with pytest.raises(ValueError, match="positive number of tokens"):
        hf_striped.ring_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="needs causal"):
        hf_striped.ring_attention(q, k, v, window=3, causal=False)


def _plain(q, k, v, dout, window, dtype, softcap=None, sinks=None):
    leaves = [t.to(dtype).detach().clone().requires_grad_() for t in (q, k, v)]
    s = None if sinks is None else sinks.to(dtype).detach().clone().requires_grad_()
    out, lse = plain_attention(*leaves, True, None, softcap, s, window)
    out.backward(dout.to(dtype))
    res = dict(out=out.detach(), lse=lse.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
    if s is not None:
        res["dsinks"] = s.grad
    return res


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_windowed_ring_in_process_is_exact(P, layout):
    n = 24  # divisible by 2P for P = 1..4 except zigzag P=4 (needs 8 | n: yes), every layout
    for case, window in [
        (Case(seq=n, dtype=torch.float32, seed=1), 1),
        (Case(seq=n, dtype=torch.float32, seed=2), 2),
        (Case(seq=n, dtype=torch.float32, seed=3), 5),
        (Case(seq=n, dtype=torch.float32, seed=4, head_dim=64, kv_heads=6), n // P),
        (Case(seq=n, dtype=torch.bfloat16, seed=5), 7),
        (Case(seq=n, dtype=torch.float32, seed=6), n - 1),
    ]:
        _check_in_process(case, P, layout, window, f"in-process P={P} {layout} window={window} {case.dtype} d={case.head_dim}")


def _check_in_process(case, P, layout, window, label):
    """P virtual ranks in one process: out, lse, dq, dk, dv within the rule."""
    q, k, v, dout = case.inputs()
    parts = [[shard_local(t, 1, layout, r, P).clone().requires_grad_() for r in range(P)] for t in (q, k, v)]
    outs, lses = ring_attention_inprocess(*parts, layout=layout, window=window)
    sum((o.float() * shard_local(dout, 1, layout, r, P).float()).sum() for r, o in enumerate(outs)).backward()
    ours = dict(
        out=unshard_local(outs, 1, layout), lse=unshard_local(lses, 2, layout),
        dq=unshard_local([t.grad for t in parts[0]], 1, layout),
        dk=unshard_local([t.grad for t in parts[1]], 1, layout),
        dv=unshard_local([t.grad for t in parts[2]], 1, layout),
    )
    ref, base = _plain(q, k, v, dout, window, torch.float64), _plain(q, k, v, dout, window, case.dtype)
    assert_exact(label, ours, ref, base)


def _sinks(case):
    return torch.linspace(-1.0, 1.5, case.heads).to(case.dtype)


@pytest.mark.parametrize("P", [2, 3])
def test_windowed_ring_on_gloo_is_exact(dist_pool, P):
    """Real process groups; windows alone and with Gemma 2 soft-capping / gpt-oss sinks."""
    cases = [
        (Case(seq=24, seed=10), "striped", 5, None, False),
        (Case(seq=24, seed=11), "striped", 2, None, False),
        (Case(seq=24, seed=12), "contiguous", 7, None, False),
        (Case(seq=24, seed=13), "zigzag", 9, None, False),
        (Case(seq=24, seed=14), "striped", 6, 2.0, True),
        (Case(seq=24, seed=15, dtype=torch.bfloat16), "striped", 4, None, True),
    ]
    items = [(*case.inputs(), layout, dict(window=window, softcap=softcap, sinks=_sinks(case) if with_sinks else None))
             for case, layout, window, softcap, with_sinks in cases]
    per_rank = dist_pool(P).run(ring_feature_cases, items)
    for i, (case, layout, window, softcap, with_sinks) in enumerate(cases):
        ours, names = unshard_feature_results(per_rank, i, layout, with_sinks)
        sinks = _sinks(case) if with_sinks else None
        q, k, v, dout = case.inputs()
        ref = _plain(q, k, v, dout, window, torch.float64, softcap, sinks)
        base = _plain(q, k, v, dout, window, case.dtype, softcap, sinks)
        assert_exact(f"gloo P={P} {layout} window={window} softcap={softcap} sinks={with_sinks} {case.dtype}",
                     ours, ref, base, names)


def test_band_blocks_warn_once_about_the_reference_kernel():
    from hf_striped.log import reset_warnings

    reset_warnings()
    q, k, v, _ = Case(batch=1, seq=8).inputs()
    with pytest.warns(RuntimeWarning, match="band blocks run on the plain PyTorch 'reference' kernel"):
        hf_striped.ring_attention(q, k, v, window=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_striped.ring_attention(q, k, v, window=3)


@pytest.mark.parametrize("P", [2, 3])
def test_windowed_ring_with_band_row_chunks_is_exact(monkeypatch, P):
    """Bands cut into row chunks (BAND_ROWS = 4 here): triangle calls on the reference kernel,
    full and causal calls on the fused one, all merged exactly."""
    import hf_striped.core.layout

    monkeypatch.setattr(hf_striped.core.layout, "BAND_ROWS", 4)
    n = 48
    for i, (layout, window) in enumerate([("striped", 13), ("striped", 40), ("contiguous", 30), ("zigzag", 11)]):
        case = Case(seq=n, seed=20 + i)
        _check_in_process(case, P, layout, window, f"band chunks P={P} {layout} window={window}")
