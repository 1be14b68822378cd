"""Train and evaluate a tiny Llama with the Trainer; write its logged losses as JSON (rank 0).

    python tests/trainer_case.py MODEL OUT --plain               # transformers.Trainer, sdpa, 1 process
    accelerate launch ... tests/trainer_case.py MODEL OUT --cp-size 2   # StripedTrainer, striped_ring
"""

import argparse
import json
import random

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, Trainer, TrainingArguments

import hf_striped
from hf_striped.training.trainer import StripedTrainer, StripedTrainingArguments


def rows(n, seed):
    rng = random.Random(seed)
    return {"input_ids": [[rng.randrange(3, 128) for _ in range(rng.randint(20, 60))] for _ in range(n)]}


def pad_collate(features):  # the reference: right padding, pads ignored in the loss
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), n, dtype=torch.long)
    labels = torch.full((len(features), n), -100)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        labels[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
    return {"input_ids": ids, "labels": labels}


def flatten_without_cache(features):
    """DataCollatorWithFlattening's row, run without a KV cache: with one (the model's default in
    evaluation) Transformers' sdpa mask skips its packed-row check and lets documents see each
    other, so the one-process reference would not be per document."""
    return {**DataCollatorWithFlattening()(features), "use_cache": False}


def documents_eval_loss(model, rows, batch_size):
    """The evaluation loss of padding-free batches computed the plain way: each document alone
    through the model (one process, no CP context), each batch's token mean, averaged over batches."""
    model = getattr(model, "module", model)
    model.eval()
    means = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            total = count = 0
            for doc in rows[i : i + batch_size]:
                ids = torch.tensor([doc])
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
                total += float(torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))
                count += len(doc) - 1
            means.append(total / count)
    return sum(means) / len(means)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--cp-size", type=int, default=1)
    p.add_argument("--plain", action="store_true")
    p.add_argument("--train-batch", type=int, default=2, help="per device (per data-parallel replica)")
    p.add_argument("--eval-rows", type=int, default=6)
    p.add_argument("--flatten", action="store_true", help="padding-free: DataCollatorWithFlattening for both")
    a = p.parse_args()
    common = dict(
        output_dir=a.out, per_device_train_batch_size=a.train_batch, per_device_eval_batch_size=2, gradient_accumulation_steps=2,
        max_steps=4, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], seed=0, data_seed=0, use_cpu=True, disable_tqdm=True, max_grad_norm=1.0,
    )
    train, evals = Dataset.from_dict(rows(16, 1)), Dataset.from_dict(rows(a.eval_rows, 2))
    if a.plain:
        model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa")
        collate = flatten_without_cache if a.flatten else pad_collate
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=train, eval_dataset=evals, data_collator=collate)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation=hf_striped.ATTN_IMPLEMENTATION)
        args = StripedTrainingArguments(**common, cp_size=a.cp_size, ddp_find_unused_parameters=False)
        trainer = StripedTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                                 data_collator=DataCollatorWithFlattening() if a.flatten else None)
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result = {"train_losses": losses, "eval_loss": metrics["eval_loss"]}
        if a.flatten:
            result["documents_eval_loss"] = documents_eval_loss(trainer.model, evals["input_ids"], 2)
        with open(f"{a.out}/result.json", "w") as f:
            json.dump(result, f)
    # End as the README's Trainer example does. A gloo process that exits with its process groups
    # still alive can abort in interpreter teardown ("terminate called without an active
    # exception", SIGABRT; a PyTorch teardown race).
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
