"""Numerical guards and cross-rank agreement:

* q/k/v that differ between the ranks of a CP group (batch, heads, head_dim, dtype) raise the
  same ValueError on every rank, at once, instead of a hang or garbage;
* the optional NaN/Inf guard (on in every test via conftest) names the layer, rank, ring step and
  training step where a non-finite value first appeared, forward and backward, on every rank of
  the group at once; non-finite inputs are reported as upstream; with the guard off nothing is
  checked;
* rows that see no key (in a block, or in a whole band of a sliding window) give zeros and a
  log-sum-exp of -inf, never NaN, forward and backward.
"""

from __future__ import annotations

import pytest
import torch

import fault_workers
import hf_striped
from hf_striped.core.guards import NonFiniteError
from hf_striped.core.options import resolve_check_finite, resolve_timeout
from hf_striped.kernels import KERNELS
from hf_striped.core.layout import shard_local


@pytest.mark.parametrize("field", ["batch", "heads", "kv_heads", "head_dim", "dtype", "kv_heads_not_dividing"])
def test_qkv_that_differ_across_ranks_raise_on_every_rank(dist_pool, field):
    res = dist_pool(2).run(fault_workers.mismatched_qkv, field)
    for rank, (raised, msg, seconds) in enumerate(res):
        print(f"rank {rank}: {raised} after {seconds:.3f} s: {msg[:200]}")
        assert raised == "ValueError", (rank, raised, msg)
        assert seconds < 10  # an immediate verdict, not a timeout
        if field == "kv_heads_not_dividing":  # rank 1's own check refuses; rank 0 hears of it
            assert ("must be a multiple of key/value heads" in msg) if rank == 1 else \
                ("CP rank 1 of the group rejected its inputs" in msg), msg
            continue
        assert "the ranks of the CP group called it with different inputs" in msg
        label = {"batch": "batch", "heads": "query heads", "kv_heads": "key/value heads", "head_dim": "head_dim",
                 "dtype": "dtype differs"}[field]
        assert label in msg
        assert "shard it with hf_striped.shard" in msg  # the fix
        assert seconds < 10  # an immediate verdict, not a timeout


@pytest.mark.parametrize("phase,victim,step,layer", [("forward", 1, 1, 1), ("backward", 0, 0, 0)])
def test_nan_in_a_block_names_layer_rank_and_step(dist_pool, tiny_llama_dir, phase, victim, step, layer):
    res = dist_pool(2).run(fault_workers.nan_in_block, str(tiny_llama_dir), phase, victim, step, layer)
    for r, rep in enumerate(res):
        print(f"rank {r}: {rep}")
    bad = res[victim]
    assert bad["raised"] == "NonFiniteError", bad
    assert bad["rank"] == victim and bad["step"] == step and bad["train_step"] == 7
    msg = bad["message"]
    assert "NaN in 1 of" in msg
    assert f"LlamaAttention of layer {layer}, CP rank {victim} of 2 (global rank {victim}), {phase} ring step {step + 1} of 2" in msg
    assert "training step 7" in msg
    assert "backend='reference'" in msg  # what to try
    # Its peer raises too, at the same point, naming the victim: nobody waits for a timeout.
    peer = res[1 - victim]
    assert peer["raised"] == "NonFiniteError" and peer["rank"] == victim and peer["step"] == step, peer
    assert f"a NaN/Inf was found at LlamaAttention of layer {layer}, CP rank {victim} of 2, {phase} ring step {step + 1}" \
        in peer["message"]
    assert peer["seconds"] < 5  # the context's timeout: the verdict came from the check, not from a timeout


def test_non_finite_inputs_are_reported_as_upstream():
    q = torch.randn(1, 8, 2, 16)
    q[0, 3, 1, 5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"Inf in 1 of 256 entries of q at layer 3, CP rank 0 of 1, forward.*"
                                             r"training step 11: .*problem is upstream"):
        hf_striped.ring_attention(q, q, q, check_finite=True, name="layer 3", train_step=11)
    x = torch.randn(1, 8, 2, 16, requires_grad=True)
    out = hf_striped.ring_attention(x, x, x, check_finite=True)
    with pytest.raises(NonFiniteError, match="NaN in .* the output gradient .*backward.*already non-finite"):
        out.backward(torch.full_like(out, float("nan")))


def test_guard_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv("HF_STRIPED_CHECK_FINITE", raising=False)
    assert resolve_check_finite(None) is False
    q = torch.randn(1, 8, 2, 16)
    q[0, 0, 0, 0] = float("nan")
    out = hf_striped.ring_attention(q, q, q)  # nothing checked: the NaN flows through
    assert torch.isnan(out).any()
    monkeypatch.setenv("HF_STRIPED_CHECK_FINITE", "1")
    assert resolve_check_finite(None) is True
    with pytest.raises(NonFiniteError):
        hf_striped.ring_attention(q, q, q)
    assert resolve_check_finite(False) is False
    monkeypatch.setenv("HF_STRIPED_CHECK_FINITE", "enabled")
    with pytest.raises(ValueError, match="set it to 1 \\(on\\) or 0 \\(off\\)"):
        resolve_check_finite(None)


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv("HF_STRIPED_TIMEOUT", raising=False)
    assert resolve_timeout(None) == 600.0
    monkeypatch.setenv("HF_STRIPED_TIMEOUT", "42")
    assert resolve_timeout(None) == 42.0 and resolve_timeout(7) == 7.0
    monkeypatch.setenv("HF_STRIPED_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="HF_STRIPED_TIMEOUT=600"):
        resolve_timeout(None)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive, finite number of seconds"):
            hf_striped.ring_attention(torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), timeout=bad)


def test_rows_that_see_no_key_give_zeros_forward_and_backward():
    """A band block whose first rows see none of its keys: every kernel that can mask a band
    returns exact zeros and lse = -inf there, and zero (finite) gradients."""
    torch.manual_seed(0)
    q = torch.randn(2, 16, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 16, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 16, 2, 8, dtype=torch.float64, requires_grad=True)
    band = (8, 12)  # row i sees keys j with i - 12 < j <= i - 8: rows 0..7 see nothing
    banded = [kern for kern in KERNELS.values() if kern.capabilities.band]
    assert banded, "no kernel masks bands"
    for kern in banded:
        out, lse = kern.forward(q, k, v, True, 0.3, band=band)
        assert torch.equal(out[:, :8], torch.zeros_like(out[:, :8])), kern.name
        assert torch.isneginf(lse[:, :, :8]).all() and torch.isfinite(lse[:, :, 8:]).all()
        assert not torch.isnan(out).any()
        dout = torch.randn_like(out)
        dq, dk, dv = kern.backward(dout, q, k, v, out, lse, True, 0.3, band=band)
        for g in (dq, dk, dv):
            assert torch.isfinite(g).all(), kern.name
        assert torch.equal(dq[:, :8], torch.zeros_like(dq[:, :8]))


@pytest.mark.parametrize("layout", ["striped", "contiguous", "zigzag"])
def test_ring_with_blocks_of_unseen_rows_stays_finite(layout):
    """P = 4 with a sliding window of 3 tokens: most blocks leave many rows without any key
    (strictly causal striped blocks always leave local row 0 so). The merged result is finite,
    exact against float64 math, and so are the gradients (the guard is on: any NaN raises)."""
    torch.manual_seed(1)
    P, n = 4, 64
    q, k, v = (torch.randn(1, n, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    outs, lses = hf_striped.core.ring.ring_attention_inprocess(
        [shard_local(q, 1, layout, r, P) for r in range(P)], [shard_local(k, 1, layout, r, P) for r in range(P)],
        [shard_local(v, 1, layout, r, P) for r in range(P)], layout=layout, window=3, check_finite=True,
    )
    full = torch.cat([o.unsqueeze(0) for o in outs])  # [P, 1, c, h, d]
    assert torch.isfinite(full).all() and all(torch.isfinite(x).all() for x in lses)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 8 ** -0.5
    i = torch.arange(n)
    visible = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
    for r in range(P):
        torch.testing.assert_close(outs[r], shard_local(ref, 1, layout, r, P), rtol=1e-10, atol=1e-10)
    sum(o.sum() for o in outs).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("what", ["model", "positions", "dropout"])
def test_ranks_with_different_models_or_positions_all_raise(dist_pool, tiny_llama_dir, tmp_path, what):
    """Inside a model the agreement check rides on the once-per-forward position all-reduce:
    a rank that loaded another config, or passed positions sharded with another layout, makes
    every rank raise at once."""
    from models import save_tiny_llama

    other = save_tiny_llama(tmp_path / "other", num_key_value_heads=4)
    res = dist_pool(2).run(fault_workers.model_mismatch, str(tiny_llama_dir), str(other), what)
    for rank, (raised, msg, seconds) in enumerate(res):
        print(f"rank {rank}: {raised} after {seconds:.3f} s: {msg[:300]}")
        assert seconds < 10, (rank, raised, msg)
        if what == "dropout":  # rank 1 refuses dropout; rank 0 stops with it instead of waiting
            if rank == 1:
                assert raised == "NotImplementedError" and "attention dropout" in msg, msg
            else:
                assert raised == "ValueError" and "CP rank 1 of the group rejected its inputs" in msg, msg
            continue
        assert raised == "ValueError", (rank, raised, msg)
        if what == "model":
            assert "LlamaAttention of layer 0" in msg and "key/value heads ranges 2..4" in msg
        else:
            assert "must be each rank's shard, in the 'striped' layout" in msg and "hf_striped.shard(" in msg
