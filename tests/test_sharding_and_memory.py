"""shard/unshard over real process groups, and proof that no rank ever holds the whole
sequence's K/V: only point-to-point messages no larger than one local K/V block, and a peak
allocation during forward + backward below the size of the full K/V."""

import pytest
import torch

import dist_workers
import hf_striped
from hf_striped.core.ring import _SIGNATURE_FIELDS
from exactness import Case
from hf_striped.core.layout import LAYOUTS, shard_local


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_unshard_round_trip_and_gradient(dist_pool, layout):
    P = 3
    x = torch.randn(2, 6 * P, 5, dtype=torch.float64)
    res = dist_pool(P).run(dist_workers.shard_unshard, x, layout)
    w = torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape) / x.numel()
    expected_full_grad = w * sum(r + 1 for r in range(P))
    for r, out in enumerate(res):
        assert torch.equal(out["full"], x)
        torch.testing.assert_close(out["grad"], shard_local(expected_full_grad, 1, layout, r, P), rtol=1e-12, atol=0)


def test_shard_without_group_is_identity_and_checks_length():
    x = torch.arange(10)
    assert hf_striped.shard(x, dim=0) is x and hf_striped.unshard(x, dim=0) is x
    with pytest.raises(ValueError, match="unknown layout"):
        hf_striped.shard(x, dim=0, layout="diagonal")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_rank_materialises_the_full_kv(dist_pool, layout):
    """Same tokens per rank, P = 3 then P = 4: the ring must move data only in point-to-point
    messages no larger than one local K (or V) block (its only collective is the few-integer
    shape agreement check of every call), and each rank's peak of live tensor bytes during
    forward + backward must not grow with P. Gathering the whole sequence's K/V would add at
    least 2 local K/V blocks (10% of the peak here) going from P = 3 to P = 4."""
    peaks = {}
    for P in (3, 4):
        # MHA so one local K block is as large as the local Q block (the unit below)
        case = Case(seq=P * 256, batch=1, heads=4, kv_heads=4, head_dim=64, dtype=torch.float32)
        res = dist_pool(P).run(dist_workers.ring_memory, case, layout)
        for r, m in enumerate(res):
            # guard off: exactly the one agreement check of the forward (max of the signature's
            # fields, the agreement's failure flag and failing rank, and of their negations)
            assert m["collectives"] == [("all_reduce", 2 * (len(_SIGNATURE_FIELDS) + 2))], \
                f"the ring's only collectives must be its tiny agreement checks: {m['collectives']}"
            assert max(m["p2p_numels"]) <= m["local_kv_numel"]
        unit = res[0]["local_q_bytes"]
        peaks[P] = max(m["peak_bytes"] for m in res) / unit
        print(f"[{layout}] P={P}: per-rank peak during fwd+bwd {[round(m['peak_bytes'] / unit, 2) for m in res]} "
              f"local-Q units; full K+V would be {res[0]['full_kv_bytes'] / unit:.0f} units")
    assert peaks[4] <= 1.03 * peaks[3], peaks
    assert peaks[4] <= 20, "per-rank ring memory should stay a small multiple of the local Q"
