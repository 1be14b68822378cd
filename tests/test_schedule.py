"""Schedule pieces that need no processes: layouts, the mask rule per (rank, source) pair,
the merge, and the in-process driver."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_striped.core.layout import LAYOUTS, block_mask, blocks, check_length, global_indices, shard_local, unshard_local
from hf_striped.core.merge import merge_
from hf_striped.core.transport import CommStats, Post, Wait, run_inprocess


@settings(max_examples=200, deadline=None)
@given(
    layout=st.sampled_from(LAYOUTS),
    P=st.integers(1, 8),
    c_half=st.integers(1, 6),
    lead=st.integers(0, 2),
    trail=st.integers(0, 2),
)
def test_shard_unshard_round_trip(layout, P, c_half, lead, trail):
    n = P * 2 * c_half
    shape = (2,) * lead + (n,) + (3,) * trail
    x = torch.arange(math.prod(shape)).reshape(shape)
    dim = lead
    parts = [shard_local(x, dim, layout, r, P) for r in range(P)]
    assert all(p.shape[dim] == n // P for p in parts)
    assert torch.equal(unshard_local(parts, dim, layout), x)
    # the parts hold exactly the global indices the layout names, in that order
    pos = torch.arange(n)
    for r in range(P):
        assert torch.equal(shard_local(pos, 0, layout, r, P), global_indices(layout, r, P, n))
    assert torch.equal(torch.sort(torch.cat([global_indices(layout, r, P, n) for r in range(P)])).values, pos)


def test_striped_shard_is_a_view():
    x = torch.arange(12)
    part = shard_local(x, 0, "striped", 1, 3)
    assert part.data_ptr() != x.data_ptr() and part.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert part.tolist() == [1, 4, 7, 10]


@pytest.mark.parametrize("layout, P, n, pad_to", [("striped", 4, 10, 12), ("contiguous", 3, 7, 9), ("zigzag", 2, 6, 8), ("zigzag", 3, 13, 18)])
def test_unsplittable_length_says_what_to_pad_to(layout, P, n, pad_to):
    with pytest.raises(ValueError, match=rf"Pad the sequence to {pad_to} tokens"):
        check_length(n, layout, P)
    with pytest.raises(ValueError, match=rf"{pad_to}"):
        shard_local(torch.zeros(n), 0, layout, 0, P)


MASK_CASES = [
    (layout, P, c)
    for layout in LAYOUTS
    for P in (1, 2, 3, 4, 5)
    for c in (1, 2, 3, 6)
    if not (layout == "zigzag" and c % 2)  # zigzag needs an even count per rank (check_length refuses odd)
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout, P, c", MASK_CASES)
def test_mask_rule_per_rank_source_pair(layout, P, c, causal):
    n = P * c
    for r in range(P):
        gq = global_indices(layout, r, P, n)
        for s in range(P):
            gk = global_indices(layout, s, P, n)
            want = (gk[None, :] <= gq[:, None]) if causal else torch.ones(c, c, dtype=torch.bool)
            assert torch.equal(block_mask(layout, r, s, P, c, causal), want), (layout, r, s)
            # sub-blocks never overlap (every score is computed once)
            cover = torch.zeros(c, c, dtype=torch.int64)
            for b in blocks(layout, r, s, P, c, causal):
                sub = torch.ones(c, c, dtype=torch.int64)[b.q, b.k]
                cover[b.q, b.k] += sub.tril() if b.causal else sub
            assert cover.max() <= 1


def test_striped_blocks_are_causal_or_one_row_shifted():
    """Every striped block is one causal kernel call: the strict case is q[1:] against k[:-1]."""
    for r in range(4):
        for s in range(4):
            (b,) = blocks("striped", r, s, 4, 8, True)
            assert b.causal
            assert (b.q, b.k) == ((slice(None), slice(None)) if s <= r else (slice(1, None), slice(None, -1)))


def _lse64(s):
    return torch.logsumexp(s, dim=-1)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_merge_matches_float64_logsumexp_including_empty_rows(scale):
    """Split keys into chunks; some rows see nothing in some chunks, row 0 sees nothing at all.
    Merging the chunks in fp32 must match float64 attention over all keys; no NaN anywhere,
    even with scores of magnitude 1e4 (exp would overflow unless shifted)."""
    torch.manual_seed(0)
    b, h, s, k, d = 2, 3, 7, 20, 5
    scores = torch.randn(b, h, s, k, dtype=torch.float64) * scale
    values = torch.randn(b, k, h, d, dtype=torch.float64)
    visible = torch.rand(s, k) < 0.5
    visible[0] = False
    visible[3, :10] = False  # row 3 sees nothing in the first chunk
    scores = scores.masked_fill(~visible, float("-inf"))
    lse_ref = _lse64(scores)
    p = torch.exp(scores - torch.where(torch.isinf(lse_ref), 0, lse_ref)[..., None])
    out_ref = torch.einsum("bhqk,bkhd->bqhd", p, values)

    out = torch.zeros(b, s, h, d)
    lse = torch.full((b, h, s), float("-inf"))
    for chunk in (slice(0, 10), slice(10, 15), slice(15, 20)):
        sc = scores[..., chunk]
        l_b = _lse64(sc)
        p_b = torch.exp(sc - torch.where(torch.isinf(l_b), 0, l_b)[..., None])
        o_b = torch.einsum("bhqk,bkhd->bqhd", p_b, values[:, chunk])
        merge_(out, lse, o_b.float(), l_b.float())
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isneginf(lse[:, :, 0]).all() and (out[:, 0] == 0).all()
    finite = ~torch.isinf(lse_ref)
    rel = 1e-6 * scale
    print(f"merge (scale {scale}): out err {(out.double() - out_ref).abs().max():.2e}, "
          f"lse err {(lse.double() - lse_ref)[finite].abs().max():.2e}")
    assert (out.double() - out_ref).abs().max() < 1e-5
    assert ((lse.double() - lse_ref)[finite].abs() <= 1e-6 + rel * lse_ref[finite].abs() / scale).all()


def test_merge_leaves_untouched_rows_bit_identical():
    torch.manual_seed(1)
    out = torch.randn(1, 4, 2, 3)
    lse = torch.randn(1, 2, 4)
    before = out.clone(), lse.clone()
    block_out = torch.full((1, 4, 2, 3), float("nan"))  # garbage where the block saw nothing
    block_lse = torch.full((1, 2, 4), float("-inf"))
    block_out[:, 1] = 1.0
    block_lse[:, :, 1] = 0.5
    merge_(out, lse, block_out, block_lse)
    for row in (0, 2, 3):
        assert torch.equal(out[:, row], before[0][:, row]) and torch.equal(lse[:, :, row], before[1][:, :, row])
    assert not torch.isnan(out).any()
    assert torch.allclose(lse[:, :, 1], torch.logaddexp(before[1][:, :, 1], torch.tensor(0.5)))


def _echo(rank, world, rounds):
    got = []
    for i in range(rounds):
        ticket = yield Post((torch.tensor([rank * 100 + i]),))
        (t,) = yield Wait(ticket)
        got.append(int(t))
    return got


@pytest.mark.parametrize("P", [1, 2, 5])
def test_inprocess_driver_delivers_from_previous_rank(P):
    stats = [CommStats() for _ in range(P)]
    results = run_inprocess([_echo(r, P, 3) for r in range(P)], stats)
    for r in range(P):
        assert results[r] == [((r - 1) % P) * 100 + i for i in range(3)]
        assert stats[r].messages == 3 and stats[r].largest_message == 8


def test_inprocess_driver_detects_deadlock():
    def stuck():
        yield Wait(123)

    with pytest.raises(RuntimeError, match="deadlocked"):
        run_inprocess([stuck(), stuck()])


def test_merge_of_blocks_seen_by_every_row_takes_the_short_path_exactly():
    """``every_row=True`` (full and causal calls): the first block is copied bit for bit, and
    later blocks give the general path's result up to rounding."""
    torch.manual_seed(2)
    shape_out, shape_lse = (2, 6, 3, 4), (2, 3, 6)
    blocks = [(torch.randn(shape_out), torch.randn(shape_lse) * 4) for _ in range(3)]
    fast = torch.zeros(shape_out), torch.full(shape_lse, float("-inf"))
    slow = torch.zeros(shape_out), torch.full(shape_lse, float("-inf"))
    for i, (o_b, l_b) in enumerate(blocks):
        merge_(*fast, o_b, l_b, every_row=True)
        merge_(*slow, o_b, l_b)
        if i == 0:
            assert torch.equal(fast[0], o_b) and torch.equal(fast[1], l_b)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-6, atol=1e-6)
