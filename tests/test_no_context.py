"""Outside hf_striped.context_parallel, "striped_ring" must behave exactly like "sdpa":
padded batches, left padding, generate() with a KV cache, on the real SmolLM2-135M."""

import pytest
import torch
from transformers import AutoTokenizer

import hf_striped  # noqa: F401 - registers striped_ring
from models import load

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind, in four lines:",
]


@pytest.fixture(scope="module")
def pair(smollm2_dir):
    return load(smollm2_dir, "striped_ring").eval(), load(smollm2_dir, "sdpa").eval()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_identical(pair, smollm2_dir, side):
    ours, sdpa = pair
    tok = AutoTokenizer.from_pretrained(smollm2_dir, padding_side=side)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        a = ours(**batch).logits
        b = sdpa(**batch).logits
    keep = batch.attention_mask.bool()
    print(f"[{side} padding] max |striped_ring - sdpa| on real tokens: {(a - b)[keep].abs().max():.3e}")
    assert torch.equal(a[keep], b[keep])
    if side == "left":  # the mask must be honoured: without it real tokens would see the pads
        with torch.no_grad():
            unmasked = ours(input_ids=batch.input_ids).logits
        assert not torch.allclose(unmasked[keep], a[keep])


def test_generate_with_kv_cache_identical(pair, smollm2_dir):
    ours, sdpa = pair
    tok = AutoTokenizer.from_pretrained(smollm2_dir, padding_side="left")
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=24, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        a = ours.generate(**batch, **kwargs)
        b = sdpa.generate(**batch, **kwargs)
    print("generated:", [tok.decode(x[batch.input_ids.shape[1]:]) for x in a])
    assert a.shape[1] > batch.input_ids.shape[1]
    assert torch.equal(a, b)
