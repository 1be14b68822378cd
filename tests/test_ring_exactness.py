"""Ring attention vs. float64 attention: out, lse, dq, dk, dv under the exactness rule, for
P in {1, 2, 3, 4}, all layouts, batch > 1, GQA and MHA, odd and 64 head_dim, fp32 and bf16,
through the in-process transport and through real gloo process groups."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dist_workers
from exactness import Case, assert_exact, plain, reference
from hf_striped.core.layout import LAYOUTS, shard_local, unshard_local
from hf_striped.core.ring import ring_attention_inprocess

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


def _inprocess(q, k, v, dout, P, layout, **kwargs) -> dict:
    """Shard full-length q/k/v/dout over P virtual ranks, run the ring forward + backward in
    this process, and return out, lse, dq, dk, dv back in natural order. Also checks dtypes and
    shapes of every rank's results."""
    shards = [[shard_local(t, 1, layout, r, P).clone().requires_grad_() for r in range(P)] for t in (q, k, v)]
    outs, lses = ring_attention_inprocess(*shards, layout=layout, **kwargs)
    torch.autograd.backward(outs, [shard_local(dout, 1, layout, r, P) for r in range(P)])
    per_rank = [
        dict(out=outs[r].detach(), lse=lses[r], dq=shards[0][r].grad, dk=shards[1][r].grad, dv=shards[2][r].grad)
        for r in range(P)
    ]
    for r in range(P):
        assert per_rank[r]["out"].dtype == q.dtype and per_rank[r]["dk"].shape == shards[1][r].shape
        assert per_rank[r]["dq"].dtype == q.dtype and per_rank[r]["lse"].dtype in (torch.float32, torch.float64)
    return _gather(per_rank, layout)


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
    full = _inprocess(q, k, v, dout, P, layout)
    ref, base = _expected(case)
    assert_exact(f"inprocess P={P} {layout} {dtype} {shape}", full, ref, base)


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
    full = _inprocess(q, k, v, dout, P, "striped")
    ref, base = _expected(case)
    assert_exact("inprocess c=1 striped", full, ref, base)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_causal(layout):
    P = 3
    case = Case(seq=P * 8, batch=2, heads=4, kv_heads=2, head_dim=16)
    q, k, v, dout = case.inputs()
    full = _inprocess(q, k, v, dout, P, layout, causal=False)
    assert_exact(
        f"inprocess non-causal {layout}",
        full,
        reference(q, k, v, dout, causal=False),
        plain(q, k, v, dout, causal=False),
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "torch_flash", "torch_efficient", "torch_cudnn", "flash_attn"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_kernels_through_the_ring(backend, head_dim, layout):
    """PyTorch's CUDA kernels (and flash-attn if installed) in the full ring schedule, bf16,
    P = 4 virtual ranks, GQA 32/8 heads. A named backend that cannot run these inputs raises,
    and the case is skipped saying why."""
    from hf_striped.kernels import select_kernel

    P = 4
    case = Case(seq=P * 128, batch=2, heads=32, kv_heads=8, head_dim=head_dim, dtype=torch.bfloat16)
    q, k, v, dout = (t.cuda() for t in case.inputs())
    if backend != "auto":
        try:
            select_kernel(backend, q, k, v)
        except (TypeError, ValueError) as exc:
            pytest.skip(f"{backend} cannot run here: {exc}")
    full = _inprocess(q, k, v, dout, P, layout, backend=backend)
    assert_exact(f"cuda {backend} d={head_dim} {layout}", full, reference(q, k, v, dout), plain(q, k, v, dout))


@pytest.mark.parametrize("partition", [[[0, 1], [2, 3]], [[0, 2], [1, 3]]], ids=["adjacent", "interleaved"])
def test_cp_subgroups_inside_a_larger_world(dist_pool, partition):
    """DP 2 x CP 2 on 4 processes: each CP group runs its own ring (peers are found by global
    rank, so interleaved groups work too) on its own data."""
    cases = [Case(seq=2 * 12, seed=10 + i) for i in range(2)]
    results = dist_pool(4).run(dist_workers.subgroup_rings, cases, "striped", partition)
    for gi, case in enumerate(cases):
        members = sorted((r for r in results if r["group_index"] == gi), key=lambda r: r["group_rank"])
        assert len(members) == 2
        ref, base = _expected(case)
        assert_exact(f"gloo subgroup {partition[gi]}", _gather(members, "striped"), ref, base)


# HF_STRIPED_EXAMPLES=400 for a deeper search (400 passed locally with seeds 7 and 11)
@settings(max_examples=int(os.environ.get("HF_STRIPED_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    P=st.integers(1, 6),
    c_half=st.integers(1, 40),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    head_dim=st.sampled_from([1, 8, 31, 64, 80, 128]),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_inprocess(P, c_half, batch, kv_heads, groups, head_dim, layout, dtype, seed):
    """Shapes the fixed cases do not cover: up to 80 tokens per rank (past the CPU kernel's
    tiles), head_dim from 1 to 128, up to 9 query heads per KV head."""
    case = Case(seq=P * 2 * c_half, batch=batch, heads=kv_heads * groups, kv_heads=kv_heads, head_dim=head_dim,
                dtype=dtype, seed=seed)
    q, k, v, dout = case.inputs()
    full = _inprocess(q, k, v, dout, P, layout)
    ref, base = _expected(case)
    assert_exact(f"random {case} {layout} P={P}", full, ref, base)


@pytest.mark.parametrize("P", [2, 3])
def test_long_shards_cross_kernel_tiles(P):
    """256 tokens per rank: several CPU-kernel tiles per block, fp32 and bf16, striped."""
    for dtype in DTYPES:
        case = Case(seq=P * 256, batch=1, heads=4, kv_heads=2, head_dim=64, dtype=dtype, seed=3)
        q, k, v, dout = case.inputs()
        full = _inprocess(q, k, v, dout, P, "striped")
        ref, base = _expected(case)
        assert_exact(f"long shards P={P} {dtype}", full, ref, base)


def test_public_api_alone_matches_sdpa_and_validates_inputs():
    import hf_striped

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 10, 6, 16), torch.randn(2, 10, 2, 16), torch.randn(2, 10, 2, 16)
    out = hf_striped.ring_attention(q, k, v)  # group=None: ordinary causal attention here
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        hf_striped.ring_attention(q[:, :, :5], k, v)
    with pytest.raises(ValueError, match=r"\[batch, seq_local, heads, head_dim\]"):
        hf_striped.ring_attention(q[0], k, v)
    with pytest.raises(TypeError, match="one dtype"):
        hf_striped.ring_attention(q.double(), k, v)
    with pytest.raises(ValueError, match="must agree"):
        hf_striped.ring_attention(q[:, :8], k, v)
    with pytest.raises(ValueError, match="unknown layout"):
        hf_striped.ring_attention(q, k, v, layout="ring")


@pytest.mark.parametrize("layout, P, n", [("striped", 4, 23), ("contiguous", 3, 13), ("zigzag", 3, 13), ("zigzag", 2, 9)])
def test_unsplittable_length_padded_as_told_is_exact(layout, P, n):
    """A length the layout cannot split raises with the length to pad to; padding there (pads at
    the end, their output gradient zero, as label -100 makes it) leaves the real tokens exact."""
    import re

    case = Case(seq=n, batch=2, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, seed=5)
    q, k, v, dout = case.inputs()
    with pytest.raises(ValueError, match="Pad the sequence to") as err:
        shard_local(q, 1, layout, 0, P)
    target = int(re.search(r"Pad the sequence to (\d+)", str(err.value)).group(1))
    assert target % (2 * P if layout == "zigzag" else P) == 0 and 0 < target - n < (2 * P if layout == "zigzag" else P)
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, 0, 0, target - n))  # noqa: E731
    full = _inprocess(pad(q), pad(k), pad(v), pad(dout), P, layout)
    real = {name: (t[:, :, :n] if name == "lse" else t[:, :n]) for name, t in full.items()}
    ref, base = _expected(case)
    assert_exact(f"padded {n}->{target} {layout} P={P}", real, ref, base)


def test_non_contiguous_head_dim_and_odd_zigzag_shards():
    """Inputs whose head_dim is not the innermost memory dimension are computed correctly (the
    CPU op would silently misread them); zigzag shards of odd length are refused."""
    import hf_striped

    torch.manual_seed(0)
    q = torch.randn(2, 12, 16, 4).transpose(-1, -2)  # [2, 12, 4, 16] with head_dim stride 4
    k, v = torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    assert q.stride(-1) != 1
    q.requires_grad_()
    out = hf_striped.ring_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    dout = torch.randn(2, 12, 16, 4).transpose(-1, -2)
    (dq,) = torch.autograd.grad(out, q, dout)
    (dq_ref,) = torch.autograd.grad(ref, q, dout)
    torch.testing.assert_close(dq, dq_ref, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="seq_local must be even"):
        hf_striped.ring_attention(q[:, :11], k[:, :11], v[:, :11], layout="zigzag")


def test_double_backward_is_refused_not_wrong():
    import hf_striped

    q, k, v = (torch.randn(1, 6, 2, 8, requires_grad=True) for _ in range(3))
    out = hf_striped.ring_attention(q, k, v, backend="reference")
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        dq.sum().backward()
