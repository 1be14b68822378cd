"""Transformers models with attn_implementation="striped_ring" across real gloo CP groups:
logits, per-token losses and every parameter's gradient equal single-process attention within
the exactness rule (reference: float64 single process; baseline: fp32 single-process sdpa)."""

import pytest
import torch

import dist_workers
from exactness import max_err
from hf_striped.core.layout import LAYOUTS, unshard_local
from models import single_process, single_process_documents


def _rule(label, ours, ref, base):
    e_ours, e_base = max_err(ours, ref), max_err(base, ref)
    bound = 2 * e_base + 1e-5
    return e_ours, e_base, bound, f"{label}: ours {e_ours:.3e} sdpa {e_base:.3e} bound {bound:.3e}"


def _check(label, per_rank, layout, ref, base, grads=True):
    logits = unshard_local([r["logits"] for r in per_rank], 1, layout)
    losses = unshard_local([r["token_loss"] for r in per_rank], 1, layout)
    checks = [_rule("logits", logits, ref["logits"], base["logits"]),
              _rule("token_loss", losses, ref["token_loss"], base["token_loss"])]
    if grads:
        for name in ref["grads"]:
            checks.append(_rule(f"grad {name}", per_rank[0]["grads"][name], ref["grads"][name], base["grads"][name]))
    worst = max(checks, key=lambda c: c[0] / c[2])
    print(f"[{label}] {checks[0][3]} | {checks[1][3]} | worst vs bound: {worst[3]}")
    bad = [c[3] for c in checks if not c[0] <= c[2]]
    assert not bad, f"[{label}] exactness rule violated: " + "; ".join(bad)


@pytest.fixture(scope="module")
def tiny_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 128, (2, 48), generator=g)


@pytest.fixture(scope="module")
def tiny_refs(tiny_llama_dir, tiny_batch):
    return (
        single_process(tiny_llama_dir, tiny_batch, "sdpa", torch.float64),
        single_process(tiny_llama_dir, tiny_batch, "sdpa", torch.float32),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [2, 3])
def test_tiny_llama_logits_and_grads(dist_pool, tiny_llama_dir, tiny_batch, tiny_refs, P, layout):
    per_rank = dist_pool(P).run(dist_workers.model_case, tiny_llama_dir, tiny_batch, layout)
    _check(f"tiny llama CP={P} {layout}", per_rank, layout, *tiny_refs)


@pytest.mark.parametrize(
    "checkpointing, backward",
    [("non_reentrant", "inside"), ("non_reentrant", "outside"), ("reentrant", "outside"), ("non_reentrant", "thread"),
     ("reentrant", "thread")],
)
def test_gradient_checkpointing(dist_pool, tiny_llama_dir, tiny_batch, tiny_refs, checkpointing, backward):
    """Recomputation during backward must run the ring again, whether backward runs inside the
    context block, after it, or on a thread that does not see the block (CUDA autograd threads)."""
    per_rank = dist_pool(2).run(
        dist_workers.model_case, tiny_llama_dir, tiny_batch, "striped", torch.float32, True, checkpointing, backward
    )
    _check(f"tiny llama CP=2 checkpointing={checkpointing} backward={backward}", per_rank, "striped", *tiny_refs)


def test_rank_asymmetric_position_reuse_does_not_hang(dist_pool, tiny_llama_dir, tiny_batch):
    assert dist_pool(2).run(dist_workers.reused_positions, tiny_llama_dir, tiny_batch) == [True, True]


@pytest.mark.parametrize("layout", ["striped", "contiguous"])
def test_missing_position_ids_fails_on_every_rank(dist_pool, tiny_llama_dir, tiny_batch, layout):
    """Without position_ids the model numbers local tokens 0..c-1. Every rank must raise (for
    the contiguous layout rank 0's numbering even looks right locally) instead of hanging."""
    messages = dist_pool(2).run(dist_workers.missing_positions, tiny_llama_dir, tiny_batch, layout)
    for msg in messages:
        assert msg is not None and "were not passed (the model then numbers local tokens" in msg


@pytest.mark.slow
def test_smollm2_cp2_logits_and_token_losses(dist_pool, smollm2_dir):
    """The real pretrained SmolLM2-135M, CP = 2, striped: logits and per-token losses."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    import hf_striped.core.layout as layout_module

    text = open(layout_module.__file__, encoding="utf-8").read()  # our own source as input text
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] == 256
    ref = single_process(smollm2_dir, ids, "sdpa", torch.float64, want_grads=False)
    base = single_process(smollm2_dir, ids, "sdpa", torch.float32, want_grads=False)
    per_rank = dist_pool(2).run(dist_workers.model_case, smollm2_dir, ids, "striped", torch.float32, False)
    _check("SmolLM2-135M CP=2 striped", per_rank, "striped", ref, base, grads=False)


def _documents(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def _check_packed(label, per_rank, ref, base, grads=True):
    """The packed row's results (already in natural order on every rank; the row's padding past
    the documents dropped) against one process running the documents one by one."""
    n = ref["logits"].shape[1]
    ours = [dict(logits=per_rank[0]["logits"][:, :n], token_loss=per_rank[0]["token_loss"][:, :n],
                 grads=per_rank[0].get("grads"))]
    _check(label, ours, "striped", ref, base, grads=grads)


@pytest.mark.parametrize("mode", ["collator", "shard"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [2, 3])
def test_tiny_llama_packed_documents(dist_pool, tiny_llama_dir, P, layout, mode):
    """DataCollatorWithFlattening rows under CP (through hf_striped's collator, or sharded as they
    are): logits, per-token losses and gradients of the documents run one by one."""
    docs = _documents(P, [1, 2, P, 13, 3 * P + 1, 40, 7])
    ref = single_process_documents(tiny_llama_dir, docs, dtype=torch.float64)
    base = single_process_documents(tiny_llama_dir, docs, dtype=torch.float32)
    per_rank = dist_pool(P).run(dist_workers.packed_model_case, tiny_llama_dir, docs, layout, torch.float32, mode)
    _check_packed(f"tiny llama packed CP={P} {layout} {mode}", per_rank, ref, base)


@pytest.mark.slow
@pytest.mark.parametrize("P", [2, 3])
def test_smollm2_packed_documents(dist_pool, smollm2_dir, P):
    """The real SmolLM2-135M on a packed row of documents (our own source files as text)."""
    from transformers import AutoTokenizer

    import hf_striped.core.documents as documents_module

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = open(documents_module.__file__, encoding="utf-8").read()
    ids = tok(text).input_ids
    docs = [ids[:90], ids[90:91], ids[200:203], ids[300:420], ids[500:531]]
    ref = single_process_documents(smollm2_dir, docs, dtype=torch.float64, want_grads=False)
    base = single_process_documents(smollm2_dir, docs, dtype=torch.float32, want_grads=False)
    per_rank = dist_pool(P).run(dist_workers.packed_model_case, smollm2_dir, docs, "striped", torch.float32, "collator")
    _check_packed(f"SmolLM2-135M packed CP={P}", per_rank, ref, base, grads=False)
