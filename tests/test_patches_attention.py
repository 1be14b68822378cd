"""Soft-capping (Gemma 2) and attention sinks (gpt-oss ``s_aux``) through the ring, on real gloo
groups, every layout: out, lse, dq, dk, dv and the sinks' gradient within the exactness rule
(reference: float64 plain attention with the same softcap/sinks; baseline: plain attention in
the inputs' dtype)."""

from __future__ import annotations

import pytest
import torch

from dist_workers import ring_feature_cases, unshard_feature_results
from exactness import Case, assert_exact
from hf_striped.kernels.reference import plain_attention
from hf_striped.layout import LAYOUTS

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
