"""Registration of ``attn_implementation="striped_ring"`` with Transformers.

Two entries, both registered through Transformers' public interfaces (never by rebinding its
functions): the attention function and the mask function. Without the mask entry Transformers
would skip mask creation for an unknown implementation and silently drop padding.

Outside :func:`hf_striped.context_parallel` both delegate to the ``sdpa`` entries, so a model
loaded with ``striped_ring`` behaves exactly like ``sdpa`` (padding, generation with a cache).
Inside it, attention runs as ring attention over the context's group, and features the ring
does not implement raise ``NotImplementedError`` naming the feature. On a model's first forward
inside a context the family registry (``hf_striped.patches``) is consulted: refused families
raise before any attention runs, untested ones warn once.

Sliding windows, logit soft-capping (Gemma 2) and attention sinks (gpt-oss ``s_aux``) run
exactly inside a context. Outside one, where ``sdpa`` would reject soft-capping and silently
drop sinks, calls with either go to the model's own eager attention.
"""

from __future__ import annotations

import sys
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .context import active_context, state_for_attention_call
from .generation import decode_attention, decoding_cache
from ..patches import check_model, windows_reach_attention
from ..patches import rope as _rope
from ..core.ring import check_peer_spread, peer_signature, rejected_by_peer, ring_attention_call

ATTN_IMPLEMENTATION = "striped_ring"


def _refuse(feature: str, how: str) -> None:
    raise NotImplementedError(
        f"striped_ring attention under hf_striped.context_parallel does not support {feature} yet. {how}"
    )


def _check_no_dropout_or_weights(dropout, kwargs, dropout_fix: str) -> None:
    """What neither the ring nor the sharded-cache decode computes: dropout, attention weights."""
    if dropout and dropout > 0:
        _refuse(f"attention dropout (p={dropout})", dropout_fix)
    if kwargs.get("output_attentions"):
        _refuse("output_attentions", "The full attention matrix is never formed on one rank; drop output_attentions=True.")


def _check_supported(module, query, key, attention_mask, dropout, kwargs, world_size) -> None:
    _check_no_dropout_or_weights(
        dropout, kwargs,
        "Set model.config.attention_dropout = 0.0 (or call model.eval()) before training with context parallelism.",
    )
    if kwargs.get("position_bias") is not None:
        _refuse("additive position bias", "Run this model without context parallelism.")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        _refuse("non-causal (bidirectional) attention", "striped_ring is for causal language models. Load encoders "
                "with attn_implementation='sdpa' and run them outside hf_striped.context_parallel.")
    if key.shape[2] != query.shape[2]:
        _refuse(
            "a KV cache other than generate()'s",
            "Inside the block call model.generate() (or the causal-LM model with cache=hf_striped.StripedCache(...)) "
            "with the whole prompt on every rank; for training forwards pass use_cache=False.",
        )
    if attention_mask is not None:
        _refuse(
            "custom attention masks",
            "Pass no attention_mask (right padding needs none under causal attention: mask pads "
            "out of the loss with label -100).",
        )


_CHECKED_CONFIGS: dict[int, weakref.ref] = {}


def _window(module, kwargs, n: int) -> int | None:
    """The layer's sliding window if it is shorter than the sequence (``None``: plain causal)."""
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    return int(window) if window is not None and window < n else None


def _check_model_once(config) -> None:
    """The family registry's verdict, once per config object (every layer shares one)."""
    if config is None:
        return
    key = id(config)
    ref = _CHECKED_CONFIGS.get(key)
    if ref is not None and ref() is config:
        return
    check_model(config)
    try:
        _CHECKED_CONFIGS[key] = weakref.ref(config, lambda _r, key=key: _CHECKED_CONFIGS.pop(key, None))
    except TypeError:  # not weak-referenceable: check again next time (cheap)
        pass


def _eager_outside_context(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """Soft-capping or sinks outside a context: the model's own eager attention (what
    ``attn_implementation="eager"`` runs), given the additive mask it expects. ``attention_mask``
    is what ``sdpa_mask`` built: a boolean mask (True = attend), or ``None`` when the pattern is
    plain causal (query i sees keys up to ``kv_len - q_len + i``)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(
            f"striped_ring got softcap/s_aux from {type(module).__name__}, whose module has no "
            "eager_attention_forward to run them outside hf_striped.context_parallel; load the model "
            "with attn_implementation='eager' for use outside a context."
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and q_len > 1:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = attention_mask[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min
        )
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _autocast_inputs(query, key, value):
    """What SDPA gets under autocast: q, k, v in the autocast dtype. (Llama's RoPE returns float32
    q and k while v comes out of its linear layer in bfloat16.) The ring is not an autocast op
    itself, so without this it would see mixed dtypes."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return query.to(dtype), key.to(dtype), value.to(dtype)
    return query, key, value


def striped_ring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers attention function. ``query`` ``[b, heads, s, d]``, ``key``/``value``
    ``[b, kv_heads, s, d]`` (not repeated for GQA); returns ``([b, s, heads, d], None)``."""
    state = state_for_attention_call(kwargs.get("position_ids"))
    if state is None:
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            return _eager_outside_context(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    cache = decoding_cache(state)
    if cache is not None and cache.layers[module.layer_idx].keys is key:
        return _decode(module, query, key, value, dropout, scaling, kwargs, cache), None
    config = getattr(module, "config", None)
    local_error = None
    try:
        _check_model_once(config)
        _check_supported(module, query, key, attention_mask, dropout, kwargs, state.world_size)
    except (ValueError, TypeError, NotImplementedError) as exc:
        if state.world_size == 1:
            raise
        local_error = exc  # raised after the peers have heard of it (they would wait in the ring)
    query, key, value = _autocast_inputs(query, key, value)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    window = _window(module, kwargs, query.shape[2] * state.world_size)
    name = _layer_name(module)
    # One agreement per forward checks positions and, riding along, that every rank calls the
    # ring with the same shapes and accepted its inputs (later layers then agree too).
    docs = state.check_positions(
        kwargs.get("position_ids"), query.shape[0], query.shape[2],
        fields=peer_signature(q, k, v, state.layout, True, window), error=local_error,
        peer_error=rejected_by_peer(name), judge=lambda verdict: check_peer_spread(verdict, q, k, state.group, name),
        cu_seqlens=kwargs.get("cu_seq_lens_q"),
    )
    if local_error is not None:  # a later layer than the one whose check ran (that one passed)
        raise local_error
    if config is not None:
        _check_documents_fit(config, docs)
        # longrope's factor choice must agree across ranks (patches/rope.py)
        _rope.check_forward(config, kwargs["position_ids"], layout=state.layout, rank=state.rank,
                            world_size=state.world_size, seq_local=query.shape[2], documents=docs)
    out, _ = ring_attention_call(
        q, k, v, group=state.group, options=state.options, causal=True, softmax_scale=scaling,
        softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"), window=window, name=name,
        train_step=state.train_step, check_peers=False,
        cu_seqlens=None if docs is None else docs.bounds, place_documents=docs is not None and docs.placed,
    )
    return out, None


def _decode(module, query, key, value, dropout, scaling, kwargs, cache):
    """One decoded token on the sharded cache of ``generate()`` (:mod:`.generation`)."""
    _check_no_dropout_or_weights(dropout, kwargs, "Call model.eval() before generating.")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return decode_attention(module, query, key, value, cache, scale=scale, softcap=kwargs.get("softcap"),
                            sinks=kwargs.get("s_aux"), window=None if window is None else int(window),
                            name=_layer_name(module))


def _check_documents_fit(config, docs) -> None:
    """A packed document longer than the model's positions would be cut short on one process
    too; refuse it (every rank sees the same documents, so every rank raises)."""
    limit = getattr(config, "max_position_embeddings", None)
    if docs is None or limit is None:
        return
    longest = max(b - a for a, b in zip(docs.bounds, docs.bounds[1:]))
    if longest > limit:
        raise ValueError(
            f"a packed document of {longest} tokens is longer than the model's max_position_embeddings ({limit}): "
            f"split or truncate documents to at most {limit} tokens before packing"
        )


def _layer_name(module) -> str:
    idx = getattr(module, "layer_idx", None)
    return f"{type(module).__name__} of layer {idx}" if idx is not None else type(module).__name__


def striped_ring_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """Transformers mask function: ``sdpa``'s outside a context; inside one, no mask at all.

    Inside the context the ring derives causality from the layout, and the strided global
    positions each rank holds must not be mistaken for packed documents (Transformers would
    otherwise build a document mask from them). What only a mask could express is refused:
    padding that hides tokens, windows or chunks shorter than the sequence that only the mask
    knows (registered families also pass their windows to the attention function, which
    applies them), and model-specific mask functions. Refused model families
    (``hf_striped.patches``) raise here, before any layer. Transformers calls this once per
    forward on every rank, which also makes it the point where the per-forward position check
    is reset.
    """
    state = active_context()
    if state is None:
        return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)
    state.new_forward()
    _check_model_once(kwargs.get("config"))  # before any layer runs
    n = kwargs.get("q_length", 0) * state.world_size
    local = kwargs.get("local_size")
    if local is not None and local < n and not windows_reach_attention(kwargs.get("config")):
        # Registered families hand every sliding window to the attention function too, which
        # applies it in the ring; for others a window (or chunk) the mask alone knows is refused.
        _refuse(
            f"a sliding window or attention chunk of {local} tokens shorter than the sequence ({n} tokens)",
            "Use sequences no longer than the window, or run this model without context parallelism.",
        )
    if kwargs.get("use_vmap"):
        # Transformers sets use_vmap exactly when the model adds its own or/and mask functions
        # (bidirectional image tokens and similar), which the ring cannot apply.
        _refuse("model-specific attention mask functions", "Run this model without context parallelism.")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "an attention_mask that hides tokens cannot be honoured inside hf_striped.context_parallel. "
            "Use right padding and no attention_mask: under causal attention real tokens never see "
            "padding to their right, and labels of -100 keep the pads out of the loss."
        )
    return None


def register() -> None:
    """Register ``"striped_ring"`` with Transformers' attention and mask interfaces.

    Idempotent. Refuses to replace a different ``"striped_ring"`` that someone else registered.
    """
    for interface, fn in (
        (AttentionInterface, striped_ring_attention_forward),
        (AttentionMaskInterface, striped_ring_mask),
    ):
        existing = interface._global_mapping.get(ATTN_IMPLEMENTATION)
        if existing is fn:
            continue
        if existing is not None and not getattr(existing, "__module__", "").startswith("hf_striped"):
            raise RuntimeError(
                f"{interface.__name__} already has a {ATTN_IMPLEMENTATION!r} entry from "
                f"{existing.__module__}; hf_striped will not overwrite it"
            )
        interface.register(ATTN_IMPLEMENTATION, fn)
