"""LoRA SFT of the real SmolLM2-135M-Instruct on chat data (ChatML, loss on the assistant turns,
packed) with StripedSFTTrainer; writes the logged losses (rank 0) and the adapter folder.

    accelerate launch --num_processes 2 tests/trl_smoke.py OUT     # CP 2
"""

import json
import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_striped
from hf_striped.tools.pretrained import smollm2_folder
from hf_striped.trl import StripedSFTConfig, StripedSFTTrainer
from trl_workers import CHATML_WITH_GENERATION

CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do bees make?", "Bees make honey."),
]


def main():
    out = sys.argv[1]
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHATML_WITH_GENERATION  # SmolLM2's ChatML, plus {% generation %} markers
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=hf_striped.ATTN_IMPLEMENTATION,
                                                 dtype=torch.float32)
    data = Dataset.from_list([{"messages": [{"role": "system", "content": "Answer in one sentence."},
                                            {"role": "user", "content": q},
                                            {"role": "assistant", "content": a}]} for q, a in CHATS])
    args = StripedSFTConfig(
        output_dir=out, cp_size=2, max_steps=2, per_device_train_batch_size=1, learning_rate=2e-3,
        lr_scheduler_type="constant", packing=True, max_length=512, assistant_only_loss=True, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, seed=0,
        ddp_find_unused_parameters=False,  # gradient_checkpointing: SFTConfig's default (on)
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    trainer = StripedSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                peft_config=lora)
    rows = len(trainer.train_dataset)
    trainer.train()
    trainer.save_model(f"{out}/adapter")
    if trainer.is_world_process_zero():
        logs = [h for h in trainer.state.log_history if "loss" in h]
        with open(f"{out}/result.json", "w") as f:
            json.dump({"losses": [h["loss"] for h in logs], "num_tokens": logs[-1]["num_tokens"],
                       "packed_rows": rows, "base": str(folder)}, f)
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
