"""Causal blocks split into non-causal pieces plus small diagonal causal pieces (docs/design.md section 3):
the split must compute exactly the unsplit visibility, each score once, and the ring must stay
exact with splitting active."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exactness import Case, assert_exact, plain, reference
from hf_striped.kernels.torch_cpu import TorchCPUKernel
from hf_striped.core.layout import LAYOUTS, block_mask, blocks, global_indices
from test_ring_exactness import _inprocess


@settings(max_examples=300, deadline=None)
@given(
    layout=st.sampled_from(LAYOUTS),
    P=st.integers(1, 6),
    c=st.integers(1, 40),
    split=st.integers(1, 24),
    causal=st.booleans(),
    data=st.data(),
)
def test_split_mask_equals_unsplit_mask(layout, P, c, split, causal, data):
    if layout == "zigzag" and c % 2:
        c += 1  # zigzag needs an even count per rank
    r = data.draw(st.integers(0, P - 1), label="rank")
    s = data.draw(st.integers(0, P - 1), label="source")
    want = block_mask(layout, r, s, P, c, causal)
    assert torch.equal(block_mask(layout, r, s, P, c, causal, split=split), want)
    gq, gk = global_indices(layout, r, P, P * c), global_indices(layout, s, P, P * c)
    if causal:
        assert torch.equal(want, gk[None, :] <= gq[:, None])
    cover = torch.zeros(c, c, dtype=torch.int64)
    for b in blocks(layout, r, s, P, c, causal, split=split):
        if b.count > 1:  # batched pieces tile the sequence (the schedule folds them as views)
            assert b.count * b.period == c
        for qs, ks in b.pieces(c):
            sub = torch.ones(c, c, dtype=torch.int64)[qs, ks]
            assert sub.shape[0] == sub.shape[1] or not b.causal  # causal calls are square
            cover[qs, ks] += sub.tril() if b.causal else sub
    assert cover.max() <= 1  # every visible score computed exactly once


def test_split_shape_for_a_power_of_two_block():
    """c = 16, split 4: levels of 8 and 4, then four causal 4x4 diagonal squares in one call."""
    calls = blocks("striped", 2, 1, 4, 16, True, split=4)
    assert [(b.causal, b.count) for b in calls] == [(False, 1), (False, 2), (True, 4)]
    strict = blocks("striped", 1, 2, 4, 16, True, split=4)[-1]  # source > rank: j < i
    assert (strict.q, strict.k, strict.count, strict.period) == (slice(1, 4), slice(0, 3), 4, 4)
    assert blocks("striped", 2, 1, 4, 16, True) == blocks("striped", 2, 1, 4, 16, True, split=0)
    assert len(blocks("striped", 2, 1, 4, 15, True, split=4)) == 1  # odd: not split


@pytest.mark.parametrize("split", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_ring_exact_with_split(monkeypatch, P, layout, dtype, split):
    monkeypatch.setattr(TorchCPUKernel, "capabilities", replace(TorchCPUKernel.capabilities, causal_split=split))
    batches = []  # the batch size of every kernel call: > 2 means folded diagonal pieces ran
    forward, backward = TorchCPUKernel.forward, TorchCPUKernel.backward
    monkeypatch.setattr(TorchCPUKernel, "forward",
                        lambda self, q, *a, **kw: batches.append(q.shape[0]) or forward(self, q, *a, **kw))
    monkeypatch.setattr(TorchCPUKernel, "backward",
                        lambda self, o, q, *a, **kw: batches.append(q.shape[0]) or backward(self, o, q, *a, **kw))
    case = Case(batch=2, seq=P * 16, heads=6, kv_heads=2, head_dim=33, dtype=dtype, seed=P)
    q, k, v, dout = case.inputs()
    full = _inprocess(q, k, v, dout, P, layout, backend="torch_cpu")
    assert max(batches) >= 2 * 16 // (2 * split - 1)  # the split was active, forward and backward
    assert_exact(f"split={split} P={P} {layout} {dtype}", full, reference(q, k, v, dout), plain(q, k, v, dout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_exact_with_split_non_contiguous_inputs(monkeypatch, layout):
    """Transformers hands over q/k/v as transposed views of [b, h, s, d]; batched pieces of
    such inputs are copies, the accumulators stay views."""
    monkeypatch.setattr(TorchCPUKernel, "capabilities", replace(TorchCPUKernel.capabilities, causal_split=4))
    case = Case(batch=2, seq=3 * 32, heads=4, kv_heads=4, head_dim=64, seed=7)
    q, k, v, dout = case.inputs()
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    full = _inprocess(q, k, v, dout, 3, layout, backend="torch_cpu")
    assert_exact(f"split=4 non-contiguous {layout}", full, reference(q, k, v, dout), plain(q, k, v, dout))
