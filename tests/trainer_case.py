"""Train and evaluate a tiny Llama with the Trainer; write its logged losses as JSON (rank 0).

    python tests/trainer_case.py MODEL OUT --plain               # transformers.Trainer, sdpa, 1 process
    accelerate launch ... tests/trainer_case.py MODEL OUT --cp-size 2   # StripedTrainer, striped_ring
"""

import argparse
import json
import random

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--cp-size", type=int, default=1)
    p.add_argument("--plain", action="store_true")
    p.add_argument("--train-batch", type=int, default=2, help="per device (per data-parallel replica)")
    p.add_argument("--eval-rows", type=int, default=6)
    a = p.parse_args()
    common = dict(
        output_dir=a.out, per_device_train_batch_size=a.train_batch, per_device_eval_batch_size=2, gradient_accumulation_steps=2,
        max_steps=4, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], seed=0, data_seed=0, use_cpu=True, disable_tqdm=True, max_grad_norm=1.0,
    )
    train, evals = Dataset.from_dict(rows(16, 1)), Dataset.from_dict(rows(a.eval_rows, 2))
    if a.plain:
        model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa")
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=train, eval_dataset=evals, data_collator=pad_collate)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation=hf_striped.ATTN_IMPLEMENTATION)
        args = StripedTrainingArguments(**common, cp_size=a.cp_size, ddp_find_unused_parameters=False)
        trainer = StripedTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals)
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        with open(f"{a.out}/result.json", "w") as f:
            json.dump({"train_losses": losses, "eval_loss": metrics["eval_loss"]}, f)
    # End as the README's Trainer example does. A gloo process that exits with its process groups
    # still alive can abort in interpreter teardown ("terminate called without an active
    # exception", SIGABRT; a PyTorch teardown race).
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
