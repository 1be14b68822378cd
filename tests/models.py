"""Model fixtures shared by tests: a tiny random Llama saved once per session, and the real
SmolLM2-135M converted once into the hf_striped cache."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides) -> LlamaConfig:
    cfg = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def save_tiny_llama(path, seed=0, **overrides):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    with torch.no_grad():  # larger-than-init weights so attention is far from uniform
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(path)
    return path


def load(path, attn, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype)


def single_process(path, input_ids, attn="sdpa", dtype=torch.float32, want_grads=True):
    """Logits, per-token losses (labels shifted once, last position ignored) and gradients of
    the summed loss on one process."""
    model = load(path, attn, dtype)
    model.train()
    b = input_ids.shape[0]
    shift_labels = torch.cat([input_ids[:, 1:], torch.full((b, 1), -100)], dim=1)
    logits = model(input_ids=input_ids, use_cache=False).logits
    token_loss = torch.nn.functional.cross_entropy(
        logits.to(torch.float64 if dtype == torch.float64 else torch.float32).flatten(0, 1),
        shift_labels.flatten(),
        ignore_index=-100,
        reduction="none",
    ).view(b, -1)
    out = dict(logits=logits.detach(), token_loss=token_loss.detach())
    if want_grads:
        token_loss.sum().backward()
        out["grads"] = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out


def single_process_documents(path, documents, attn="sdpa", dtype=torch.float32, want_grads=True):
    """:func:`single_process` of each document alone (token id lists), concatenated: logits and
    per-token losses (a document's last token has no target), and the gradients of their sum."""
    model = load(path, attn, dtype)
    model.train()
    logits, losses = [], []
    for doc in documents:
        ids = torch.tensor([doc])
        shift = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
        out = model(input_ids=ids, use_cache=False).logits
        logits.append(out)
        losses.append(torch.nn.functional.cross_entropy(
            out.to(torch.float64 if dtype == torch.float64 else torch.float32).flatten(0, 1), shift.flatten(),
            ignore_index=-100, reduction="none")[None])
    token_loss = torch.cat(losses, dim=1)
    result = dict(logits=torch.cat(logits, dim=1).detach(), token_loss=token_loss.detach())
    if want_grads:
        token_loss.sum().backward()
        result["grads"] = {name: p.grad.clone() for name, p in model.named_parameters()}
    return result


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(path, attn, rank=4, seed=0):
    """The model at ``path`` as a PEFT LoRA model on every attention and MLP projection, the same on
    every process (seeded). Its B matrices are random, not PEFT's zeros, so that the A matrices get
    gradients too (with B = 0 they would be exactly 0 on any number of processes)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)
    model = get_peft_model(load(path, attn), config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model
