"""Soft-capping (Gemma 2) and attention sinks (gpt-oss ``s_aux``) through the ring, on real gloo
groups, every layout: out, lse, dq, dk, dv and the sinks' gradient within the exactness rule
(reference: float64 plain attention with the same softcap/sinks; baseline: plain attention in
the inputs' dtype)."""

from __future__ import annotations

import pytest
import torch

import hf_striped

from dist_workers import ring_feature_cases, unshard_feature_results
from exactness import Case, assert_exact
from hf_striped.kernels.reference import plain_attention
from hf_striped.core.layout import LAYOUTS

VARIANTS = {"softcap": dict(softcap=1.5), "sinks": dict(sinks=True), "both": dict(softcap=3.0, sinks=True)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sinks(case: Case) -> torch.Tensor:
    return torch.randn(case.heads, generator=torch.Generator().manual_seed(case.seed + 7)).to(case.dtype)


def _inputs(case: Case):
    q, k, v, dout = case.inputs()
    return q * 2, k * 2, v, dout  # larger scores, so the cap bends them


def _plain(case: Case, variant: dict, dtype):
    """Plain attention (autograd) in ``dtype`` from the case's rounded inputs."""
    q, k, v, dout = (t.to(dtype) for t in _inputs(case))
    sinks = _sinks(case).to(dtype) if variant.get("sinks") else None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    s = sinks.detach().clone().requires_grad_() if sinks is not None else None
    out, lse = plain_attention(*leaves, True, None, variant.get("softcap"), s)
    out.backward(dout)
    res = dict(out=out.detach(), lse=lse.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
    if s is not None:
        res["dsinks"] = s.grad
    return res


def _items(cases):
    return [
        (*_inputs(case), layout, dict(softcap=variant.get("softcap"), sinks=_sinks(case) if variant.get("sinks") else None))
        for case, variant, layout in cases
    ]


def _cases():
    return [
        (Case(dtype=dtype, seed=i), VARIANTS[name], layout)
        for i, (name, dtype) in enumerate((n, d) for n in VARIANTS for d in DTYPES.values())
        for layout in LAYOUTS
    ]


@pytest.mark.parametrize("P", [1, 2, 3])
def test_softcap_and_sinks_exact_across_ranks(dist_pool, P):
    cases = _cases()
    items = _items(cases)
    per_rank = [ring_feature_cases(0, 1, items)] if P == 1 else dist_pool(P).run(ring_feature_cases, items)
    for i, (case, variant, layout) in enumerate(cases):
        ours, names = unshard_feature_results(per_rank, i, layout, bool(variant.get("sinks")))
        ref, base = _plain(case, variant, torch.float64), _plain(case, variant, case.dtype)
        label = f"P={P} {layout} {case.dtype} " + ",".join(f"{k}={v}" for k, v in variant.items())
        assert_exact(label, ours, ref, base, names)


def test_softcap_warns_once_about_speed_and_bad_arguments_raise():
    from hf_striped.log import reset_warnings

    reset_warnings()
    q, k, v, _ = Case(batch=1, seq=8).inputs()
    with pytest.warns(RuntimeWarning, match="soft-capping runs on the plain PyTorch 'reference' kernel"):
        hf_striped.ring_attention(q, k, v, softcap=2.0)
    with pytest.warns(RuntimeWarning, match="backend 'torch_cpu' cannot soft-cap"):
        hf_striped.ring_attention(q, k, v, softcap=2.0, backend="torch_cpu")
    with pytest.raises(ValueError, match="softcap must be positive"):
        hf_striped.ring_attention(q, k, v, softcap=0.0)
    with pytest.raises(ValueError, match="one logit per query head"):
        hf_striped.ring_attention(q, k, v, sinks=torch.zeros(q.shape[2] + 1))


@pytest.mark.parametrize("mask", ["causal", "full", "band"])
def test_reference_kernel_row_chunks_change_nothing(monkeypatch, mask):
    """The reference kernel bounds memory by working through query rows in chunks; with chunks
    of a few rows it must give what one chunk gives (same math per row; dk/dv summed over
    chunks), soft-capping included."""
    import hf_striped.kernels.reference as ref_module

    q, k, v, dout = Case(batch=2, seq=20, dtype=torch.float64).inputs()
    kern = ref_module.ReferenceKernel()
    kwargs = dict(band=(-3, 4), softcap=1.5) if mask == "band" else dict(softcap=1.5)
    causal = mask == "causal"
    whole = kern.forward(q, k, v, causal, 0.3, **kwargs)
    whole_grads = kern.backward(dout, q, k, v, *whole, causal, 0.3, **kwargs)
    monkeypatch.setattr(ref_module, "SCORE_ELEMENTS", 2 * 6 * 20 * 3)  # 3 rows per chunk
    assert len(ref_module._row_chunks(q, k)) == 7
    chunked = kern.forward(q, k, v, causal, 0.3, **kwargs)
    chunked_grads = kern.backward(dout, q, k, v, *chunked, causal, 0.3, **kwargs)
    for a, b in zip((*whole, *whole_grads), (*chunked, *chunked_grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
