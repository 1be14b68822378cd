"""Plain PyTorch attention (any dtype, float64 included) for tests and for shapes no fused
kernel takes. Slow and memory-hungry (it materialises the score matrix); exact by construction."""

from __future__ import annotations

import torch

from .base import KernelCapabilities, expand_kv, gqa_groups, reduce_kv_grad


def band_mask(sq: int, sk: int, band: tuple[int, int], device=None) -> torch.Tensor:
    """``[sq, sk]`` bool: query i sees key j iff ``lo <= i - j <= hi`` (``band = (lo, hi)``)."""
    d = torch.arange(sq, device=device)[:, None] - torch.arange(sk, device=device)[None, :]
    return (d >= band[0]) & (d <= band[1])


def _scores(q, k, causal: bool, scale: float, acc_dtype, softcap: float | None = None,
            band: tuple[int, int] | None = None, row0: int = 0) -> torch.Tensor:
    """Masked, scaled (and, with ``softcap``, soft-capped: ``cap * tanh(s / cap)``) scores
    ``[b, h, sq, sk]`` in ``acc_dtype``. ``band``, if given, replaces ``causal`` (see
    :func:`band_mask`). ``row0``: ``q`` holds the rows from ``row0`` on of a larger call (the
    mask is that call's)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc_dtype), k.to(acc_dtype)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    sq, sk = q.shape[1], k.shape[1]
    if band is None and causal:
        band = (0, sq + row0)
    if band is not None:
        s = s.masked_fill(~band_mask(sq, sk, (band[0] - row0, band[1] - row0), q.device), float("-inf"))
    return s


_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

SCORE_ELEMENTS = 1 << 24
"""The reference kernel works through query rows in chunks whose score matrix has at most about
this many elements (64 MiB in float32), so long blocks do not need ``b * h * sq * sk`` memory."""


def _row_chunks(q, k):
    b, sq, h, _ = q.shape
    rows = max(1, SCORE_ELEMENTS // max(1, b * h * k.shape[1]))
    return [(r0, min(r0 + rows, sq)) for r0 in range(0, sq, rows)]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(s - lse)`` with rows that see no key (lse = -inf) giving zeros, not NaN."""
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s - lse_safe[..., None])


class ReferenceKernel:
    """Math attention accumulating in float32 (float64 for float64 inputs).

    ``softcap=cap`` in forward/backward: scores are soft-capped as Gemma 2 does
    (``cap * tanh(s / cap)`` after scaling, before masking); the backward applies the chain rule
    through the tanh. ``band=(lo, hi)``: an arbitrary diagonal band mask (sliding windows), query
    i sees key j iff ``lo <= i - j <= hi``; it replaces ``causal``."""

    name = "reference"
    capabilities = KernelCapabilities(band=True, softcap=True, float32_backward=True)

    def for_call(self) -> ReferenceKernel:
        return self

    def unsupported_reason(self, q, k, v):
        # float8 is a storage format: the math would run (in float32) but the ring's final
        # rounding to float8 keeps ~2 significant bits of every output and gradient, which is no
        # attention anyone asked for; integer and complex tensors are not attention inputs.
        if q.dtype not in _DTYPES:
            return f"dtype {q.dtype} is not one of {_DTYPES}"
        gqa_groups(q, k)
        return None

    def forward(self, q, k, v, causal, scale, band=None, softcap=None):
        g = gqa_groups(q, k)
        k, v = expand_kv(k, g), expand_kv(v, g)
        acc = _acc_dtype(q.dtype)
        b, sq, h, _ = q.shape
        out = torch.empty(b, sq, h, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.empty(b, h, sq, dtype=acc, device=q.device)
        for r0, r1 in _row_chunks(q, k):
            s = _scores(q[:, r0:r1], k, causal, scale, acc, softcap, band, r0)
            lse[:, :, r0:r1] = torch.logsumexp(s, dim=-1)  # -inf for rows that see nothing
            p = _probs(s, lse[:, :, r0:r1])
            out[:, r0:r1] = torch.einsum("bhqk,bkhd->bqhd", p, v.to(acc))
        return out, lse  # in the accumulation dtype: the ring rounds once, at the end

    def backward(self, dout, q, k, v, out, lse, causal, scale, band=None, softcap=None):
        g = gqa_groups(q, k)
        ke, ve = expand_kv(k, g), expand_kv(v, g)
        acc = _acc_dtype(q.dtype)
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(ke.shape, dtype=acc, device=q.device)
        dv = torch.zeros(ve.shape, dtype=acc, device=q.device)
        for r0, r1 in _row_chunks(q, ke):
            qc = q[:, r0:r1]
            s = _scores(qc, ke, causal, scale, acc, softcap, band, r0)
            p = _probs(s, lse[:, :, r0:r1].to(acc))
            do = dout[:, r0:r1].to(acc)
            dv += torch.einsum("bhqk,bqhd->bkhd", p, do)
            dp = torch.einsum("bqhd,bkhd->bhqk", do, ve.to(acc))
            delta = (do * out[:, r0:r1].to(acc)).sum(-1).transpose(1, 2)  # [b, h, rows]
            ds = p * (dp - delta[..., None])
            if softcap is not None:  # s = cap * tanh(raw / cap): d s / d raw = 1 - (s / cap)^2
                ds = ds * (1 - (s.masked_fill(torch.isinf(s), 0.0) / softcap) ** 2)
            dq[:, r0:r1] = torch.einsum("bhqk,bkhd->bqhd", ds, ke.to(acc)) * scale
            dk += torch.einsum("bhqk,bqhd->bkhd", ds, qc.to(acc)) * scale
        return dq, reduce_kv_grad(dk, g), reduce_kv_grad(dv, g)


def plain_attention(q, k, v, causal: bool = True, scale: float | None = None, softcap: float | None = None,
                    sinks: torch.Tensor | None = None, window: int | None = None):
    """Differentiable attention computed entirely in the input dtype (no upcast), returning
    ``(out, lse)``. This is the "same-dtype plain PyTorch" baseline of the exactness rule.

    ``softcap``: Gemma 2 soft-capping. ``sinks`` ``[heads]``: gpt-oss attention sinks, one extra
    logit per head that joins the softmax denominator and carries no value; ``lse`` then
    includes it. ``window``: causal sliding window of that many tokens (query i sees keys
    ``i - window < j <= i``, Transformers' convention)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    g = gqa_groups(q, k)
    k, v = expand_kv(k, g), expand_kv(v, g)
    s = _scores(q, k, causal, scale, q.dtype, softcap, None if window is None else (0, window - 1))
    if sinks is not None:
        b, h, sq, _ = s.shape
        s = torch.cat([s, sinks.to(s.dtype)[None, :, None, None].expand(b, h, sq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse
