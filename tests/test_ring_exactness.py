"""Ring attention vs. float64 attention: out, lse, dq, dk, dv under the exactness rule, for
P in {1, 2, 3, 4}, all layouts, batch > 1, GQA and MHA, odd and 64 head_dim, fp32 and bf16,
through the in-process transport and through real gloo process groups."""

import pytest
import torch

import dist_workers
from exactness import Case, assert_exact, plain, reference
from hf_striped.layout import LAYOUTS, shard_local, unshard_local
from hf_striped.ring import ring_attention_inprocess

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = {
    "gqa3-d33": dict(batch=2, heads=6, kv_heads=2, head_dim=33),
    "mha-d64": dict(batch=3, heads=4, kv_heads=4, head_dim=64),
}


def _case(P, dtype, shape, tokens_per_rank=14, seed=0):
    return Case(seq=P * tokens_per_rank, dtype=dtype, seed=seed + P, **SHAPES[shape])


def _gather(per_rank: list[dict], layout: str) -> dict:
    full = {}
    for name in ("out", "dq", "dk", "dv"):
        full[name] = unshard_local([r[name] for r in per_rank], 1, layout)
    full["lse"] = unshard_local([r["lse"] for r in per_rank], 2, layout)
    return full


def _expected(case):
    q, k, v, dout = case.inputs()
    return reference(q, k, v, dout), plain(q, k, v, dout)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_inprocess_transport(P, layout, dtype, shape):
    case = _case(P, dtype, shape)
    q, k, v, dout = case.inputs()
    shards = [[shard_local(t, 1, layout, r, P).clone() for r in range(P)] for t in (q, k, v)]
    for ts in shards:
        for t in ts:
            t.requires_grad_()
    outs, lses = ring_attention_inprocess(*shards, layout=layout)
    torch.autograd.backward(outs, [shard_local(dout, 1, layout, r, P) for r in range(P)])
    per_rank = [
        dict(out=outs[r].detach(), lse=lses[r], dq=shards[0][r].grad, dk=shards[1][r].grad, dv=shards[2][r].grad)
        for r in range(P)
    ]
    for r in range(P):
        assert per_rank[r]["out"].dtype == dtype and per_rank[r]["dk"].shape == shards[1][r].shape
    ref, base = _expected(case)
    assert_exact(f"inprocess P={P} {layout} {dtype} {shape}", _gather(per_rank, layout), ref, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [2, 3, 4])
def test_dist_transport(dist_pool, P, layout, dtype):
    case = _case(P, dtype, "gqa3-d33", tokens_per_rank=10)
    per_rank = dist_pool(P).run(dist_workers.ring_case, case, layout)
    ref, base = _expected(case)
    assert_exact(f"gloo P={P} {layout} {dtype}", _gather(per_rank, layout), ref, base)


@pytest.mark.parametrize("P", [2, 3, 4])
def test_dist_transport_mha_d64(dist_pool, P):
    case = _case(P, torch.float32, "mha-d64", tokens_per_rank=16)
    per_rank = dist_pool(P).run(dist_workers.ring_case, case, "striped")
    ref, base = _expected(case)
    assert_exact(f"gloo P={P} striped mha-d64", _gather(per_rank, "striped"), ref, base)


def test_one_token_per_rank():
    """c = 1: the striped strict-causal blocks are empty; rows must still be exact."""
    P = 4
    case = Case(seq=P, batch=1, heads=2, kv_heads=1, head_dim=8)
    q, k, v, dout = case.inputs()
    shards = [[shard_local(t, 1, "striped", r, P).clone().requires_grad_() for r in range(P)] for t in (q, k, v)]
    outs, lses = ring_attention_inprocess(*shards, layout="striped")
    torch.autograd.backward(outs, [shard_local(dout, 1, "striped", r, P) for r in range(P)])
    per_rank = [
        dict(out=outs[r].detach(), lse=lses[r], dq=shards[0][r].grad, dk=shards[1][r].grad, dv=shards[2][r].grad)
        for r in range(P)
    ]
    ref, base = _expected(case)
    assert_exact("inprocess c=1 striped", _gather(per_rank, "striped"), ref, base)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_causal(layout):
    P = 3
    case = Case(seq=P * 8, batch=2, heads=4, kv_heads=2, head_dim=16)
    q, k, v, dout = case.inputs()
    shards = [[shard_local(t, 1, layout, r, P).clone().requires_grad_() for r in range(P)] for t in (q, k, v)]
    outs, lses = ring_attention_inprocess(*shards, layout=layout, causal=False)
    torch.autograd.backward(outs, [shard_local(dout, 1, layout, r, P) for r in range(P)])
    per_rank = [
        dict(out=outs[r].detach(), lse=lses[r], dq=shards[0][r].grad, dk=shards[1][r].grad, dv=shards[2][r].grad)
        for r in range(P)
    ]
    assert_exact(
        f"inprocess non-causal {layout}",
        _gather(per_rank, layout),
        reference(q, k, v, dout, causal=False),
        plain(q, k, v, dout, causal=False),
    )
