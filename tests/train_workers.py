"""Functions the multi-process training tests run on every rank of a gloo pool."""

from __future__ import annotations

import contextlib

import torch

import hf_striped  # noqa: F401 - registers striped_ring
from hf_striped.training.parallel import ContextParallel
from models import load


def micro_batches(features: list, dp_rank: int, dp_size: int, steps: int) -> list[list]:
    """Replica ``dp_rank``'s rows of one global batch, split into ``steps`` micro-batches."""
    mine = features[dp_rank::dp_size]
    return [mine[i::steps] for i in range(steps)]


def _collator(cp: ContextParallel, packing: str | None):
    """The rank's collator: padded rows (``None``), rows packed by hf_striped (``"packing"``) or
    by Transformers' ``DataCollatorWithFlattening`` (``"flatten"``)."""
    if packing == "flatten":
        from transformers import DataCollatorWithFlattening

        return cp.collator(pad_token_id=0, base_collator=DataCollatorWithFlattening())
    return cp.collator(pad_token_id=0, packing=packing == "packing")


def train_step_case(rank, world, model_dir, features, cp_size, layout="striped", accumulation=1, dtype=torch.float32,
                    packing=None):
    """One optimizer step's forward + backward of ``features`` (the global batch) under
    DDP x CP with gradient accumulation; returns the reported loss and (rank 0) the gradients.
    ``packing``: see :func:`_collator`."""
    torch.manual_seed(0)
    cp = ContextParallel(cp_size, layout=layout)
    model = load(model_dir, "striped_ring", dtype)
    model.train()
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    collate = _collator(cp, packing)
    batches = [collate(rows) for rows in micro_batches(features, cp.dp_rank, cp.dp_size, accumulation)]
    n = cp.num_items(batches)
    reported = 0.0
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or world == 1
        with contextlib.nullcontext() if sync else wrapped.no_sync():
            loss, out = cp.forward(wrapped, batch, n)
            loss.backward()
        reported += float(out.loss.detach())
    result = dict(loss=float(cp.reduce_sum(reported)), num_items=int(n))
    if rank == 0:
        result["grads"] = {name: p.grad.clone() for name, p in model.named_parameters()}
    return result


def mismatched_batches_case(rank, world, model_dir, features):
    """Give the two ranks of a CP group different global batches; return the error text."""
    cp = ContextParallel(world)
    model = load(model_dir, "striped_ring")
    rows = features if rank == 0 else features[::-1]
    batch = cp.collator(pad_token_id=0)(rows)
    try:
        cp.forward(model, batch, cp.num_items([batch]))
    except ValueError as exc:
        return str(exc)
    return None


def bad_cp_size_case(rank, world, cp_size):
    try:
        ContextParallel(cp_size)
    except ValueError as exc:
        return str(exc)
    return None


def gather_case(rank, world, model_dir, features, layout):
    """Un-permuted logits and per-token losses of the CP group, on every rank."""
    cp = ContextParallel(world, layout=layout)
    model = load(model_dir, "striped_ring")
    batch = cp.check_batch(cp.collator(pad_token_id=0)(features))
    with torch.no_grad(), cp.context():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return dict(logits=cp.gather(logits), token_loss=cp.token_losses(logits, batch["shift_labels"]))


def lora_step_case(rank, world, model_dir, features, cp_size):
    """One packed optimizer step's forward + backward of a LoRA model (``models.lora_model``) under
    DP x CP, every row of ``features`` a document; returns the loss and (rank 0) the gradients of the
    trainable (adapter) parameters, by name."""
    from models import lora_model

    cp = ContextParallel(cp_size)
    model = lora_model(model_dir, "striped_ring")
    model.train()
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    batch = cp.collator(pad_token_id=0, packing=True)(features[cp.dp_rank::cp.dp_size])
    n = cp.num_items([batch])
    loss, out = cp.forward(wrapped, batch, n)
    loss.backward()
    result = dict(loss=float(cp.reduce_sum(float(out.loss.detach()))), num_items=int(n))
    if rank == 0:
        result["grads"] = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return result
