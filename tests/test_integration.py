"""Registration and the NotImplementedError / ValueError contract of striped_ring inside a
context (group=None: this process alone, so no process group is needed)."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import hf_striped
from hf_striped.kernels.reference import plain_attention
from hf_striped.integration import striped_ring_attention_forward, striped_ring_mask
from models import load


def test_register_is_idempotent_and_refuses_foreign_entries():
    before = (AttentionInterface._global_mapping["striped_ring"], AttentionMaskInterface._global_mapping["striped_ring"])
    hf_striped.register()
    hf_striped.register()
    assert before == (striped_ring_attention_forward, striped_ring_mask)
    assert AttentionInterface._global_mapping["striped_ring"] is striped_ring_attention_forward
    AttentionInterface.register("striped_ring", lambda *a, **k: None)
    try:
        with pytest.raises(RuntimeError, match="will not overwrite"):
            hf_striped.register()
    finally:
        AttentionInterface.register("striped_ring", striped_ring_attention_forward)
    # built-in entries are untouched
    assert AttentionInterface._global_mapping["sdpa"].__module__.startswith("transformers")


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def _qkv(b=1, h=4, hk=2, s=8, d=16):
    torch.manual_seed(0)
    return torch.randn(b, h, s, d), torch.randn(b, hk, s, d), torch.randn(b, hk, s, d)


def _call(**kwargs):
    q, k, v = _qkv()
    kwargs.setdefault("position_ids", torch.arange(8)[None])
    mask = kwargs.pop("attention_mask", None)
    dropout = kwargs.pop("dropout", 0.0)
    return striped_ring_attention_forward(_Module(), q, k, v, mask, dropout=dropout, scaling=0.25, **kwargs)


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        (dict(dropout=0.1), "dropout"),
        (dict(output_attentions=True), "output_attentions"),
        (dict(is_causal=False), "non-causal"),
        (dict(attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool)), "attention masks"),
    ],
)
def test_unsupported_features_raise_inside_context(kwargs, feature):
    with hf_striped.context_parallel(None):
        with pytest.raises(NotImplementedError, match=feature):
            _call(**kwargs)


def test_kv_cache_inside_context_raises():
    q, k, v = _qkv()
    with hf_striped.context_parallel(None):
        with pytest.raises(NotImplementedError, match="KV cache"):
            striped_ring_attention_forward(_Module(), q[:, :, -1:], k, v, None, position_ids=torch.tensor([[7]]))


def test_window_as_long_as_sequence_is_plain_causal():
    with hf_striped.context_parallel(None):
        out, weights = _call(sliding_window=8)
    q, k, v = _qkv()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    assert weights is None
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=0, atol=1e-6)


def test_missing_or_bad_positions_raise():
    with hf_striped.context_parallel(None):
        with pytest.raises(ValueError, match="needs position_ids"):
            _call(position_ids=None)
        with pytest.raises(ValueError, match="neither"):  # restarts that are no documents' starts
            _call(position_ids=torch.tensor([[0, 1, 2, 3, 1, 2, 3, 4]]))
        # packed documents: positions restarting at 0 keep each document to itself
        packed, _ = _call(position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))
        out, _ = _call(position_ids=torch.arange(100, 108)[None])  # an offset base is fine
    assert out.shape == (1, 8, 4, 16)
    q, k, v = (t.transpose(1, 2) for t in _qkv())
    for a, b in ((0, 3), (3, 8)):
        ref, _ = plain_attention(q[:, a:b], k[:, a:b], v[:, a:b], causal=True, scale=0.25)
        torch.testing.assert_close(packed[:, a:b], ref, rtol=1e-5, atol=1e-6)


def test_padding_mask_inside_context_raises_and_all_ones_is_dropped():
    with hf_striped.context_parallel(None):
        assert striped_ring_mask(batch_size=1, q_length=4, kv_length=4, attention_mask=torch.ones(1, 4, dtype=torch.bool)) is None
        with pytest.raises(ValueError, match="right padding"):
            striped_ring_mask(batch_size=1, q_length=4, kv_length=4, attention_mask=torch.tensor([[1, 1, 1, 0]]).bool())


def test_context_arguments_are_validated():
    with pytest.raises(ValueError, match="layout"):
        with hf_striped.context_parallel(None, layout="spiral"):
            pass
    with pytest.raises(ValueError, match="backend"):
        with hf_striped.context_parallel(None, backend="nope"):
            pass


def test_model_inside_context_alone_matches_sdpa(tiny_llama_dir):
    """A model run through the ring with P = 1 (our kernels) matches sdpa; dropout in training
    mode is refused through the real model."""
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 16))
    ours, ref = load(tiny_llama_dir, "striped_ring"), load(tiny_llama_dir, "sdpa")
    with torch.no_grad(), hf_striped.context_parallel(None):
        a = ours(input_ids=ids, position_ids=torch.arange(16).expand(2, -1)).logits
    b = ref(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    ours.config.attention_dropout = 0.1
    for layer in ours.model.layers:
        layer.self_attn.attention_dropout = 0.1
    ours.train()
    with hf_striped.context_parallel(None), pytest.raises(NotImplementedError, match="dropout"):
        ours(input_ids=ids, position_ids=torch.arange(16).expand(2, -1))


def test_mask_only_windows_and_custom_mask_functions_raise_inside_context():
    """Some models apply a sliding window or chunked attention only through the mask function
    (local_size), or add their own mask functions (Transformers then sets use_vmap); the ring
    cannot honour either, so inside a context they must raise, not be dropped."""
    base = dict(batch_size=1, q_length=8, kv_length=8, attention_mask=None)
    with hf_striped.context_parallel(None):
        assert striped_ring_mask(**base, local_size=8) is None  # a window as long as the sequence is causal
        with pytest.raises(NotImplementedError, match="sliding window or attention chunk of 4 tokens"):
            striped_ring_mask(**base, local_size=4)
        with pytest.raises(NotImplementedError, match="model-specific attention mask functions"):
            striped_ring_mask(**base, use_vmap=True)


def test_mask_only_sliding_window_through_a_real_model(tmp_path):
    """Qwen2-MoE passes its window to the mask only, never to the attention function."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=2, num_experts_per_tok=1, use_sliding_window=True, sliding_window=4, max_window_layers=0,
        layer_types=["sliding_attention"] * 2,
    )
    Qwen2MoeForCausalLM(cfg).save_pretrained(tmp_path)
    model = load(tmp_path, "striped_ring").eval()
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad(), hf_striped.context_parallel(None), pytest.raises(NotImplementedError, match="sliding window"):
        model(input_ids=ids, position_ids=torch.arange(16)[None])


@pytest.mark.filterwarnings("ignore:hf_striped. sliding-window band blocks:RuntimeWarning")
@pytest.mark.parametrize("where", ["kwarg", "module"])
def test_sliding_window_is_applied_inside_context(where):
    """A window shorter than the sequence, passed as the sliding_window argument or set on the
    module, is applied by the ring (exactness across ranks:
    test_patches_windows.py)."""
    from hf_striped.kernels.reference import plain_attention

    module = _Module()
    kwargs = {}
    if where == "module":
        module.sliding_window = 3
    else:
        kwargs["sliding_window"] = 3
    q, k, v = _qkv()
    with hf_striped.context_parallel(None):
        out, _ = striped_ring_attention_forward(module, q, k, v, None, scaling=0.25, position_ids=torch.arange(8)[None],
                                                **kwargs)
    ref, _ = plain_attention(*(t.transpose(1, 2).double() for t in (q, k, v)), True, 0.25, None, None, 3)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_mask_only_window_is_allowed_for_families_that_pass_it_to_attention():
    """Registered windowed families hand the window to the attention function too, so the mask
    function lets local_size through for them (and only for them)."""
    from transformers import MistralConfig

    base = dict(batch_size=1, q_length=8, kv_length=8, attention_mask=None, local_size=4)
    with hf_striped.context_parallel(None):
        assert striped_ring_mask(**base, config=MistralConfig(sliding_window=4)) is None
        with pytest.raises(NotImplementedError, match="sliding window or attention chunk of 4 tokens"):
            striped_ring_mask(**base, config=type("Cfg", (), {"model_type": "llama4_text"})())


@pytest.mark.filterwarnings("ignore:hf_striped. attention logit soft-capping:RuntimeWarning")
@pytest.mark.parametrize("kwargs", [dict(softcap=0.7), dict(s_aux=torch.linspace(-1, 2, 4)), dict(softcap=1.5, s_aux=torch.ones(4))])
def test_softcap_and_sinks_run_inside_context(kwargs):
    """Soft-capping and sinks inside a context are computed by the ring (exactness across ranks: test_patches_attention.py)."""
    from hf_striped.kernels.reference import plain_attention

    with hf_striped.context_parallel(None):
        out, _ = _call(**kwargs)
    q, k, v = (t.transpose(1, 2).double() for t in _qkv())
    sinks = kwargs.get("s_aux")
    ref, _ = plain_attention(q, k, v, True, 0.25, kwargs.get("softcap"), None if sinks is None else sinks.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
