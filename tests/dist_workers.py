"""Functions run on every rank of a gloo pool (see dist_pool.py). Module-level so they pickle."""

from __future__ import annotations

import torch
import torch.distributed as dist

import hf_striped
from hf_striped.ring import ring_attention_with_lse


def ring_case(rank, world, case, layout, backend="auto"):
    """Shard the case's full inputs, run ring attention forward + backward over WORLD, and
    return this rank's (out, lse, dq, dk, dv)."""
    q, k, v, dout = case.inputs()
    group = dist.group.WORLD
    parts = [hf_striped.shard(t, dim=1, group=group, layout=layout).clone() for t in (q, k, v, dout)]
    ql, kl, vl, dl = parts
    for t in (ql, kl, vl):
        t.requires_grad_()
    out, lse = ring_attention_with_lse(ql, kl, vl, group=group, layout=layout, backend=backend)
    out.backward(dl)
    return dict(out=out.detach(), lse=lse, dq=ql.grad, dk=kl.grad, dv=vl.grad)
