"""The exactness rule of docs/design.md section 9 (from flash-attention's test suite):

    max|ours - ref| <= 2 * max|plain - ref| + 1e-5

``ref`` is computed in float64 from the same (dtype-rounded) inputs, ``plain`` is plain PyTorch
attention computed in the inputs' dtype. Worst errors are printed before asserting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_striped.kernels.reference import ReferenceKernel, plain_attention

QUANTITIES = ("out", "lse", "dq", "dk", "dv")


@dataclass(frozen=True)
class Case:
    batch: int = 2
    seq: int = 24
    heads: int = 6
    kv_heads: int = 2
    head_dim: int = 33
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def inputs(self):
        """q, k, v, dout in ``dtype`` (identical on every process for the same seed)."""
        g = torch.Generator().manual_seed(self.seed)
        b, n, h, hk, d = self.batch, self.seq, self.heads, self.kv_heads, self.head_dim
        q = torch.randn(b, n, h, d, generator=g)
        k = torch.randn(b, n, hk, d, generator=g)
        v = torch.randn(b, n, hk, d, generator=g)
        dout = torch.randn(b, n, h, d, generator=g)
        return tuple(t.to(self.dtype) for t in (q, k, v, dout))


def reference(q, k, v, dout, causal=True):
    """float64 ground truth: dict of out, lse, dq, dk, dv."""
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    scale = q.shape[-1] ** -0.5
    kern = ReferenceKernel()
    out, lse = kern.forward(q, k, v, causal, scale)
    dq, dk, dv = kern.backward(dout, q, k, v, out, lse, causal, scale)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def plain(q, k, v, dout, causal=True):
    """Same-dtype plain PyTorch attention and its autograd gradients."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = plain_attention(q, k, v, causal)
    out.backward(dout)
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_exact(label: str, ours: dict, ref: dict, base: dict, names=QUANTITIES) -> None:
    """Print the worst errors of ``ours`` and ``base`` against ``ref``, then assert the rule."""
    rows, failures = [], []
    for name in names:
        if torch.isnan(ours[name].double()).any():
            failures.append(f"{name} has NaN")
            continue
        e_ours, e_plain = max_err(ours[name], ref[name]), max_err(base[name], ref[name])
        bound = 2 * e_plain + 1e-5
        rows.append(f"{name}: ours {e_ours:.3e}  plain {e_plain:.3e}  bound {bound:.3e}")
        if not e_ours <= bound:
            failures.append(f"{name}: {e_ours:.3e} > {bound:.3e}")
    print(f"[{label}] " + " | ".join(rows))
    assert not failures, f"[{label}] exactness rule violated: " + "; ".join(failures)
