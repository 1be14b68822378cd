"""Loss and gradients of context-parallel training equal one process on the same global batch.

Criterion (docs/design.md section 9: fp32 relative error <= 1e-5 on the loss, <= 1e-4 on gradients): for each
parameter, max|g_cp - g_one| <= 1e-4 * max|g_one|; the loss: |l_cp - l_one| <= 1e-5 * |l_one|.
"""

from __future__ import annotations

import random

import pytest
import torch

import hf_striped  # noqa: F401
from hf_striped.training.data import StripingCollator
from models import load
from train_workers import bad_cp_size_case, gather_case, mismatched_batches_case, train_step_case


def ragged_rows(n_rows: int, vocab: int, lengths: tuple[int, int], seed: int, labels: bool = False) -> list[dict]:
    """Rows of different lengths (so the collator pads), some with prompt tokens masked out."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        n = rng.randint(*lengths)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        row = {"input_ids": ids}
        if labels:  # an SFT-style prompt whose tokens are not trained on
            k = rng.randint(0, n // 3)
            row["labels"] = [-100] * k + ids[k:]
        rows.append(row)
    return rows


def single_process_step(model_dir, features, dtype=torch.float32):
    """The global mean token loss of ``features`` and its gradients, on one process (sdpa)."""
    model = load(model_dir, "sdpa", dtype)
    model.train()
    batch = StripingCollator(cp_rank=0, cp_size=1, pad_token_id=0).global_batch(features)
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(
        logits.to(torch.promote_types(dtype, torch.float32)).flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100
    )
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters()}


def single_process_documents(model_dir, features, dtype=torch.float32):
    """The mean token loss over every document of ``features`` (each row one document), each run
    alone through the model on one process, and its gradients: what packed training must equal."""
    model = load(model_dir, "sdpa", dtype)
    model.train()
    total, count = 0.0, 0
    for f in features:
        ids = torch.tensor([f["input_ids"]])
        labels = torch.tensor([f.get("labels", f["input_ids"])])[:, 1:]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                          reduction="sum")
        count += int(labels.ne(-100).sum())
    loss = total / count
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_step(result, ref_loss, ref_grads, label):
    rel_loss = abs(result["loss"] - ref_loss) / abs(ref_loss)
    worst = max(
        (float((result["grads"][k] - g).abs().max() / g.abs().max().clamp_min(1e-30)), k) for k, g in ref_grads.items()
    )
    print(f"{label}: loss {result['loss']:.7f} vs {ref_loss:.7f} (rel {rel_loss:.1e}); worst grad rel err {worst[0]:.1e} ({worst[1]})")
    assert rel_loss <= 1e-5
    assert worst[0] <= 1e-4, worst
    assert set(result["grads"]) == set(ref_grads)


def _packed_rows(n_rows: int, seed: int) -> list[dict]:
    """Documents of 1 to 40 tokens (single tokens, fewer than P, and long ones), half with a
    masked prompt."""
    rows = ragged_rows(n_rows, 128, (1, 40), seed=seed, labels=True)
    rows[0]["input_ids"], rows[1]["input_ids"] = rows[0]["input_ids"][:1], rows[1]["input_ids"][:2]
    for r in rows[:2]:
        r["labels"] = list(r["input_ids"])
    return rows


@pytest.mark.parametrize(
    "world, cp_size, layout, accumulation, packing",
    [
        (2, 2, "striped", 1, "packing"),
        (2, 2, "striped", 1, "flatten"),
        (3, 3, "striped", 2, "packing"),
        (3, 3, "zigzag", 1, "flatten"),
        (3, 3, "contiguous", 1, "packing"),
        (4, 2, "striped", 2, "flatten"),  # 2 data-parallel replicas x CP 2
    ],
)
def test_packed_step_equals_one_process_per_document(dist_pool, tiny_llama_dir, world, cp_size, layout, accumulation,
                                                      packing):
    """Padding-free packed rows (hf_striped's packing, or Transformers' DataCollatorWithFlattening
    as the base collator) under CP: the loss and gradients of the documents run one by one."""
    features = _packed_rows(12, seed=world * 7 + cp_size)
    ref_loss, ref_grads = single_process_documents(tiny_llama_dir, features)
    results = dist_pool(world).run(train_step_case, tiny_llama_dir, features, cp_size, layout, accumulation,
                                   torch.float32, packing)
    assert len({r["loss"] for r in results}) == 1, "every rank must report the same loss"
    assert results[0]["num_items"] == sum(
        sum(t != -100 for t in f.get("labels", f["input_ids"])[1:]) for f in features
    )
    assert_same_step(results[0], ref_loss, ref_grads, f"packed ({packing}) world {world}, cp {cp_size}, {layout}")


@pytest.mark.parametrize(
    "world, cp_size, layout, accumulation",
    [
        (2, 2, "striped", 1),
        (2, 2, "zigzag", 2),
        (3, 3, "striped", 1),
        (3, 3, "contiguous", 2),
        (4, 2, "striped", 2),  # 2 data-parallel replicas x CP 2, with gradient accumulation
        (4, 4, "striped", 1),
    ],
)
def test_cp_step_equals_one_process(dist_pool, tiny_llama_dir, world, cp_size, layout, accumulation):
    features = ragged_rows(8, 128, (20, 70), seed=world * 10 + cp_size, labels=True)
    ref_loss, ref_grads = single_process_step(tiny_llama_dir, features)
    results = dist_pool(world).run(train_step_case, tiny_llama_dir, features, cp_size, layout, accumulation)
    assert len({r["loss"] for r in results}) == 1, "every rank must report the same loss"
    assert results[0]["num_items"] == sum(
        sum(t != -100 for t in f.get("labels", f["input_ids"])[1:]) for f in features
    )
    assert_same_step(results[0], ref_loss, ref_grads, f"world {world}, cp {cp_size}, {layout}, accumulation {accumulation}")


def test_cp_step_equals_one_process_smollm2(dist_pool, smollm2_dir):
    """SmolLM2 (30 layers): the 1e-4 gradient criterion sits at fp32's own noise floor
    here (one-process eager and sdpa differ by 1.3e-4 on the layer-0 norm weight for this batch),
    so gradients follow the exactness rule (docs/design.md section 9) instead: against a float64 one-process reference, our
    worst parameter is at most 2x as far off as one-process fp32 sdpa's worst (+1e-6). The loss
    keeps 1e-5."""
    features = ragged_rows(2, 49152, (60, 96), seed=3)
    ref_loss, ref_grads = single_process_step(smollm2_dir, features)
    loss64, grads64 = single_process_step(smollm2_dir, features, dtype=torch.float64)
    result = dist_pool(2).run(train_step_case, smollm2_dir, features, 2)[0]

    def rel(g, ref):
        return float((g.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))

    rel_loss = abs(result["loss"] - ref_loss) / abs(ref_loss)
    ours = {k: rel(result["grads"][k], g) for k, g in grads64.items()}
    base = {k: rel(ref_grads[k], g) for k, g in grads64.items()}
    worst, worst_base = max(grads64, key=ours.get), max(grads64, key=base.get)
    vs_fp32 = max(rel(result["grads"][k], ref_grads[k].double()) for k in ref_grads)
    print(f"SmolLM2-135M, cp 2: loss rel err {rel_loss:.1e}; worst gradient error vs float64: ours {ours[worst]:.1e} "
          f"({worst}), one-process fp32 sdpa {base[worst_base]:.1e} ({worst_base}); ours vs fp32 sdpa {vs_fp32:.1e}")
    assert rel_loss <= 1e-5
    # per tensor the fp32 noise itself varies too much to bound each one by its own baseline
    assert ours[worst] <= 2 * base[worst_base] + 1e-6


def test_batches_that_differ_across_a_cp_group_are_refused(dist_pool, tiny_llama_dir):
    features = ragged_rows(2, 128, (30, 40), seed=5)
    errors = dist_pool(2).run(mismatched_batches_case, tiny_llama_dir, features)
    assert all(e is not None and "different batches" in e and "prepare_dataloader" in e for e in errors), errors


def test_cp_size_must_divide_world(dist_pool):
    errors = dist_pool(3).run(bad_cp_size_case, 2)
    assert all(e is not None and "does not divide the world size 3" in e for e in errors), errors


@pytest.mark.parametrize("layout", ["striped", "zigzag"])
def test_gather_unpermutes_logits_and_token_losses(dist_pool, tiny_llama_dir, layout):
    features = ragged_rows(2, 128, (30, 45), seed=9)
    batch = StripingCollator(cp_rank=0, cp_size=1, pad_token_id=0).global_batch(features)
    n = batch["input_ids"].shape[1]  # the 3-rank collator pads further (right padding): compare these n
    with torch.no_grad():
        ref = load(tiny_llama_dir, "sdpa")(input_ids=batch["input_ids"], use_cache=False).logits
    results = dist_pool(3).run(gather_case, tiny_llama_dir, features, layout)
    for r in results:
        got = r["logits"][:, :n]
        assert r["logits"].shape[1] == -(-n // (6 if layout == "zigzag" else 3)) * (6 if layout == "zigzag" else 3)
        err = float((got - ref).abs().max())
        print(f"{layout}: max |gathered logits - one process| {err:.1e}")
        assert err <= 1e-4
        losses = torch.nn.functional.cross_entropy(
            ref.flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100, reduction="none"
        ).view(ref.shape[:2])
        assert float((r["token_loss"][:, :n] - losses).abs().max()) <= 1e-4
