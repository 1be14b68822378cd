"""TRL SFT runs for tests/test_trl.py: a tiny random Llama, a tiny byte-level ChatML tokenizer built
here (no download), three kinds of data, and one function that trains and evaluates a case either
with TRL's stock ``SFTTrainer`` on one process (sdpa) or with ``StripedSFTTrainer`` in a gloo pool.

Every run of a case sees the same model weights, data and LoRA initialisation (seeded), so the
one-process and the context-parallel runs can be compared number for number.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the Hub from rank 0 otherwise

import datasets  # noqa: E402
from huggingface_hub import constants  # noqa: E402

constants.HF_HUB_DISABLE_TELEMETRY = True  # also when the Hub library was imported before this module
datasets.disable_progress_bars()

# ChatML (SmolLM2's format) with the {% generation %} markers assistant_only_loss needs; SmolLM2's
# own template has none.
CHATML_WITH_GENERATION = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
            task_type="CAUSAL_LM")

# name -> (data kind, SFTConfig options, LoRA: None | "peft_config" | "get_peft_model")
CASES = {
    # prompt-completion rows, loss on the completion only, packed (bfd: padding-free rows of documents);
    # evaluated on unpacked rows (which the padding-free collator flattens)
    "completion_packed": ("prompt_completion", dict(packing=True, max_length=192, eval_packing=False), None),
    # conversations, loss on the assistant turns only, right-padded rows; LoRA from peft_config, with
    # gradient checkpointing (SFTConfig's default)
    "assistant_padded_lora": ("conversational", dict(assistant_only_loss=True, max_length=256,
                                                     gradient_checkpointing=True), "peft_config"),
    # plain text, padding-free without packing, TRL's pads to a multiple of 16 (1-token documents), the
    # DFT loss; a model wrapped by peft.get_peft_model beforehand
    "text_padding_free_lora": ("text", dict(padding_free=True, max_length=None, pad_to_multiple_of=16,
                                            loss_type="dft"), "get_peft_model"),
}


def chat_tokenizer():
    """A byte-level tokenizer (256 byte tokens, no merges) with ChatML's two special tokens:
    every text tokenizes, and the model stays tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_WITH_GENERATION
    return fast


def tiny_model(tokenizer, attn: str):
    """A 2-layer random Llama; weights scaled up so attention is far from uniform."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def rows(kind: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        filler = " please" * rng.randint(0, 6)
        question, answer = f"What is {a} plus {b}{filler}?", f"{a} plus {b} is {a + b}."
        if kind == "prompt_completion":
            out.append({"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}"})
        elif kind == "conversational":
            c = rng.randrange(10)
            out.append({"messages": [
                {"role": "system", "content": "Add."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": f"And plus {c}?"},
                {"role": "assistant", "content": f"{a + b + c}."},
            ]})
        else:
            out.append({"text": f"{question} {answer}"})
    return out


def run_case(name: str, out_dir: str, cp_size: int = 1, batch: int = 2, steps: int = 2) -> dict:
    """Train ``steps`` optimizer steps and evaluate case ``name``; return the logged metrics, the
    gradients at every optimizer step (after clipping, before the update) and the fraction of
    masked training labels. ``cp_size=1``: stock SFTTrainer, sdpa, this process alone;
    otherwise StripedSFTTrainer over the current process group."""
    import peft
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    kind, options, lora = CASES[name]
    tokenizer = chat_tokenizer()
    common = dict(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, per_device_eval_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2 if lora else 1e-3, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0, data_seed=0,
        disable_tqdm=True, ddp_find_unused_parameters=False, gradient_checkpointing=False,
    )
    common.update(options)
    if cp_size == 1:
        args, trainer_cls, attn = SFTConfig(**common), SFTTrainer, "sdpa"
    else:
        import hf_striped
        from hf_striped.trl import StripedSFTConfig, StripedSFTTrainer

        args, trainer_cls = StripedSFTConfig(**common, cp_size=cp_size), StripedSFTTrainer
        attn = hf_striped.ATTN_IMPLEMENTATION
    model = tiny_model(tokenizer, attn)
    extra = {}
    torch.manual_seed(1)  # the LoRA initialisation
    if lora == "get_peft_model":
        model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    elif lora == "peft_config":
        extra["peft_config"] = peft.LoraConfig(**LORA)

    class Grads(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                               if p.requires_grad})

    grads = Grads()
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows(kind, 16, 1)),
                          eval_dataset=Dataset.from_list(rows(kind, 5, 2)), processing_class=tokenizer,
                          callbacks=[grads], **extra)
    labels = [x for r in trainer.train_dataset["labels"] for x in r]
    trainer.train()
    metrics = trainer.evaluate()
    logs = [{k: h[k] for k in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")}
            for h in trainer.state.log_history if "loss" in h]
    return dict(logs=logs, eval=metrics, grads=grads.steps, masked=labels.count(-100) / len(labels),
                peft=isinstance(trainer.model, peft.PeftModel), train_rows=len(trainer.train_dataset),
                documents=sum(len(r) for r in trainer.train_dataset["seq_lengths"])
                if "seq_lengths" in trainer.train_dataset.column_names else None)


def pool_cases(rank: int, world: int, names: list[str], out_dir: str,
               sdpa_refusal: bool = False) -> dict | None:
    """Every rank of a gloo pool runs ``names`` under CP 2 (world / 2 data-parallel replicas);
    rank 0 returns the results (and, with ``sdpa_refusal``, what a CP trainer says to an sdpa model)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    results = {name: run_case(name, f"{out_dir}/{name}-{world}-{rank}", cp_size=2) for name in names}
    if sdpa_refusal:
        from datasets import Dataset

        from hf_striped.trl import StripedSFTConfig, StripedSFTTrainer

        tokenizer = chat_tokenizer()
        args = StripedSFTConfig(output_dir=f"{out_dir}/sdpa-{rank}", cp_size=2, use_cpu=True, bf16=False,
                                report_to="none")
        try:
            StripedSFTTrainer(model=tiny_model(tokenizer, "sdpa"), args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(rows("text", 2, 0)))
            results["refusal"] = "no error"
        except ValueError as exc:
            results["refusal"] = str(exc)
    return results if rank == 0 else None
