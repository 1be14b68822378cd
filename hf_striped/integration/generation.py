"""Long prompts under context parallelism: the prompt is prefilled with the ring (each rank
computes only its stripe), then tokens are decoded on the sharded KV cache, all through the
usual ``model.generate()`` called on every rank inside :func:`hf_striped.context_parallel`.

**The cache.** :class:`StripedCache` (a Transformers :class:`~transformers.Cache`) holds this
rank's shard of every layer's keys and values: position p lives on rank ``p mod P`` at local
index ``p // P``. A striped prefill leaves exactly that layout (the padding that makes the
prompt a multiple of P sits at its end and is dropped afterwards), and decoding stores token t
on rank ``t mod P``, so the shards stay within one token of each other as the cache grows::

    positions   0 1 2 3 4 5 6 | 7 8 9 ...      (P = 3, a 7-token prompt, then decoded tokens)
    rank 0      0     3     6 |     9
    rank 1        1     4     | 7
    rank 2          2     5   |   8

**Decoding.** Every rank runs the new token through the model (the same input everywhere).
Each attention layer attends its query to the rank's own shard only (the token's own key is
in its owner's shard), giving a partial ``(out, lse)``; one all-gather per layer brings every
rank's partial, and each rank merges them by log-sum-exp in rank order, so every rank gets the
same bits (and sampling with the same seed draws the same token everywhere). Sliding windows
mask the shard by position (and a sliding layer's shard drops the keys no later query sees, so
it holds about window / P tokens), soft-capping applies to the scores, attention sinks join the
merged result once.

**Wiring.** ``generate()`` gives the model the whole prompt on every rank, and the model would
run every layer over all of it. While a ``context_parallel`` block is active, a module
forward pre-hook (installed on entry, removed on exit) attaches two hooks to the decoder of
every ``striped_ring`` generative model it sees called: before the decoder runs, a forward
with a cache is turned into this rank's stripe of the prompt (prefill) or given the new token's
global position (decode); after it, the prefill's last prompt token's hidden state, which lives
on one rank, is shared with every rank, so the language-model head and ``generate()`` see what
one process would. Nothing of ``generate()`` is replaced. The default cache ``generate()``
creates is swapped for a :class:`StripedCache`; a cache of another type passed in is refused.

**Checks.** Before the prefill, one agreement compares the prompt (length, batch, a hash of
its tokens) and ``generate()``'s settings (its ``GenerationConfig``, read from the calling
frame: ``generate`` does not hand it to the model) across the group; every decode step's
gather also carries each rank's step and input tokens, compared by every rank. A mismatch
raises on every rank. A rank that dies or stops early leaves its peers a bounded wait (the
context's timeout) and a :class:`hf_striped.RingCommError`.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation.utils import GenerationMixin

from ..core import guards
from ..core.merge import merge_
from ..core.ring import _apply_sinks, group_rank_size
from .context import ContextParallelState, active_context

_EMPTY, _PREFILL, _DECODE = "empty", "prefill", "decode"


class StripedLayer(DynamicLayer):
    """One layer's K/V shard of a :class:`StripedCache` (``keys``/``values``
    ``[batch, kv_heads, local tokens, head_dim]``, local index i holding position
    ``rank + i * P``)."""

    is_croppable = False

    def __init__(self, cache: "StripedCache"):
        super().__init__()
        self._cache = cache
        self.dropped = 0  # local tokens dropped from the front (out of every later query's window)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        cache = self._cache
        if cache.phase == _EMPTY:
            raise RuntimeError(
                "a StripedCache is filled by model.generate() (or a forward given the whole prompt) inside "
                "hf_striped.context_parallel; it was used outside one. Generate inside the block, or use a DynamicCache "
                "outside it."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if cache.phase == _PREFILL or cache.owner(cache.length) == cache.rank:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        elif self.keys.numel() == 0:  # no token of this rank yet: an empty shard of the right shape
            shape = (*key_states.shape[:2], 0, key_states.shape[-1])
            self.keys, self.values = key_states.new_empty(shape), value_states.new_empty(shape)
        return self.keys, self.values

    def local_length(self) -> int:
        return 0 if not self.is_initialized or self.keys is None or self.keys.dim() < 3 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        """Tokens the whole group's cache holds (what Transformers counts positions from)."""
        return self._cache.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a StripedCache cannot be cropped (assisted or speculative decoding); generate without an assistant "
            "model inside hf_striped.context_parallel"
        )

    def keep_first(self, n: int) -> None:
        """Drop all but the first ``n`` local tokens (the prefill's padding)."""
        if self.local_length() > n:
            self.keys, self.values = self.keys[..., :n, :].clone(), self.values[..., :n, :].clone()

    def drop_before(self, position: int) -> None:
        """Drop the local tokens at global positions below ``position`` (a sliding window layer's
        keys no later query sees), copying what is kept so their memory is freed."""
        cache = self._cache
        k = min(self.local_length(), max(0, -(-(position - cache.rank) // cache.world_size) - self.dropped))
        if k:
            self.keys, self.values = self.keys[..., k:, :].clone(), self.values[..., k:, :].clone()
            self.dropped += k


class StripedCache(Cache):
    """A KV cache sharded round-robin over a context-parallel group: position p on rank
    ``p mod P`` (module docstring). ``generate()`` inside :func:`hf_striped.context_parallel`
    makes one by itself; pass one as ``cache=`` to keep it after ``generate()`` returns."""

    def __init__(self, config, group: dist.ProcessGroup | None = None):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        super().__init__(layers=[StripedLayer(self) for _ in range(text.num_hidden_layers)])
        self.group = group
        self.rank, self.world_size = group_rank_size(group)
        self.length = 0  # tokens of the sequence the group's cache covers (the next token's position)
        self.phase = _EMPTY
        self.prompt_length = 0
        self.timeout: float | None = None
        self.step_tokens: torch.Tensor | None = None  # the decode step's input ids, in every gather's header
        self.checked_step = -1  # the last position whose header every rank compared

    def owner(self, position: int) -> int:
        """The rank that stores the K/V of global ``position``."""
        return position % self.world_size

    def positions(self, layer_idx: int, device=None) -> torch.Tensor:
        """Global positions of this rank's cached tokens of layer ``layer_idx``, in local order."""
        layer = self.layers[layer_idx]
        return (torch.arange(layer.local_length(), device=device) + layer.dropped) * self.world_size + self.rank

    def memory_bytes(self) -> int:
        """Bytes of keys and values this rank holds, over all layers."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values) if t is not None)


# ---------------------------------------------------------------------------------------------
# Hooks: installed on the decoder of a generative striped_ring model while a context is active


def _is_striped_generator(module) -> bool:
    # runs on every module call inside a context: the isinstance check first
    return isinstance(module, GenerationMixin) and getattr(
        getattr(module, "config", None), "_attn_implementation", None) == "striped_ring"


def _decoder_of(model):
    try:
        decoder = model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        decoder = getattr(model, "model", None)
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None


def _attach_on_call(module, _args) -> None:
    """Global forward pre-hook while a context is active: give a striped_ring generative model's
    decoder the generation hooks, once (it is called before its decoder, so they apply to this
    very call)."""
    if not _is_striped_generator(module):
        return None
    decoder = _decoder_of(module)
    if decoder is None or getattr(decoder, "_hf_striped_generation_hooks", None) is not None:
        return None
    decoder._hf_striped_generation_hooks = (
        decoder.register_forward_pre_hook(_before_decoder, with_kwargs=True),
        decoder.register_forward_hook(_after_decoder, with_kwargs=True),
    )
    return None


class _Attacher:
    """Reference-counted global pre-hook: present while any context_parallel block is active."""

    def __init__(self):
        self.count, self.handle = 0, None

    def __enter__(self):
        if self.count == 0:
            self.handle = torch.nn.modules.module.register_module_forward_pre_hook(_attach_on_call)
        self.count += 1

    def __exit__(self, *exc):
        self.count -= 1
        if self.count == 0 and self.handle is not None:
            self.handle.remove()
            self.handle = None


attach_while_active = _Attacher()


def _cache_kwarg(kwargs) -> tuple[str, object]:
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return "cache", None


def _before_decoder(module, args, kwargs):
    state = active_context()
    name, cache = _cache_kwarg(kwargs)
    if state is None or cache is None:
        return None
    state.generation_cache = None
    if args:
        raise TypeError("inside hf_striped.context_parallel, call the model with keyword arguments when it is given a cache")
    if isinstance(cache, StripedCache) and cache.phase == _DECODE:
        kwargs = _decode_inputs(kwargs, cache, state)
    else:
        cache, error = _prefill_cache(cache, module, state)
        kwargs[name] = cache
        kwargs = _prefill_inputs(kwargs, cache, state, error)
    state.generation_cache = cache  # what this forward's attention layers decode on (cleared after it)
    return args, kwargs


def _prefill_cache(cache, module, state: ContextParallelState) -> tuple[object, BaseException | None]:
    """The cache the prefill fills: the caller's empty StripedCache, or one replacing the empty
    default cache ``generate()`` made; and the error refusing any other cache (raised on every
    rank by the prompt agreement)."""
    error = None
    if isinstance(cache, StripedCache):
        if cache.phase != _EMPTY:
            error = ValueError("this StripedCache was already used for another prompt; pass a new one")
        elif cache.world_size != state.world_size or cache.group is not state.group:
            error = ValueError("this StripedCache was made for another process group than the context's; make it "
                               "with StripedCache(model.config, group=<the group given to context_parallel>)")
    elif type(cache) is not DynamicCache or getattr(cache, "_is_user_defined", False) or cache.get_seq_length():
        error = TypeError(
            f"inside hf_striped.context_parallel generation keeps its KV cache sharded over the group in a "
            f"hf_striped.StripedCache; got a {type(cache).__name__}. Pass no cache (generate() then makes one) or "
            f"cache=hf_striped.StripedCache(model.config, group=group); other cache types work outside the block"
        )
    else:
        cache = StripedCache(module.config, group=state.group)
    return cache, error


def _prefill_inputs(kwargs, cache, state: ContextParallelState, error: BaseException | None) -> dict:
    """The whole prompt (identical on every rank) -> this rank's stripe of it, padded at the end
    to a multiple of P, with global positions; checks the prompt and settings across ranks."""
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    x = ids if ids is not None else embeds
    error = error or _prompt_error(kwargs, x)
    n = x.shape[1] if error is None else 0
    _agree_on_prompt(state, x, n, error)
    P, r = state.world_size, state.rank
    padded = -(-n // P) * P
    positions = torch.arange(padded, device=x.device)
    if padded > n:  # padding after the prompt: no prompt token sees it (causal), dropped afterwards
        fill = x[:, -1:].expand(x.shape[0], padded - n, *x.shape[2:])
        x = torch.cat([x, fill], dim=1)
    kwargs["input_ids" if ids is not None else "inputs_embeds"] = x[:, r::P].contiguous()
    kwargs["position_ids"] = positions[r::P].expand(x.shape[0], -1)
    kwargs["attention_mask"] = None
    kwargs["use_cache"] = True
    cache.phase, cache.prompt_length, cache.timeout = _PREFILL, n, state.options.timeout
    return kwargs


def _prompt_error(kwargs, x) -> BaseException | None:
    if x is None:
        return ValueError("generation inside hf_striped.context_parallel needs input_ids or inputs_embeds")
    if x.shape[1] == 0:
        return ValueError("the prompt is empty: give generate() at least one token")
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.all()):
        return ValueError(
            "generate() inside hf_striped.context_parallel takes a batch of prompts only when none is padded "
            "(attention_mask all ones): give prompts of one length per call, or one prompt at a time"
        )
    pos = kwargs.get("position_ids")
    if pos is not None and not torch.equal(pos.reshape(-1, pos.shape[-1])[0].cpu(), torch.arange(pos.shape[-1])):
        return ValueError("a prompt's position_ids inside hf_striped.context_parallel must be 0, 1, ..., len - 1 "
                          "(or not given)")
    return None


def _generation_config() -> GenerationConfig | None:
    """The ``GenerationConfig`` of the ``generate()`` call this forward runs in (``None`` for a
    forward not made by ``generate()``). ``generate()`` does not pass its settings to the model,
    so they are read from its frame (``_prefill``'s argument)."""
    frame = sys._getframe(1)
    for _ in range(32):
        if frame is None:
            break
        if frame.f_code.co_name in ("_prefill", "_sample", "generate"):
            config = frame.f_locals.get("generation_config")
            if isinstance(config, GenerationConfig):
                return config
        frame = frame.f_back
    return None


def _settings(config: GenerationConfig | None) -> str:
    if config is None:
        return ""
    public = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and not torch.is_tensor(v)}
    return repr(sorted(public.items()))


def _settings_error(config: GenerationConfig | None) -> BaseException | None:
    if config is not None and config.max_time is not None:
        return ValueError(
            f"generate(max_time={config.max_time}) inside hf_striped.context_parallel could stop the ranks at "
            "different tokens (each measures its own time), leaving the others waiting: use max_new_tokens"
        )
    return None


def _agree_on_prompt(state: ContextParallelState, x, n: int, error) -> None:
    config = _generation_config()
    error = error or _settings_error(config)
    ids = x.detach().to("cpu").contiguous() if x is not None and error is None else None
    fields = {
        "prompt tokens": n,
        "batch size": 0 if ids is None else ids.shape[0],
        "prompt": 0 if ids is None else guards.checksum(str(ids.dtype), ids.numpy().tobytes()),
        "generation settings": guards.checksum(_settings(config)),
    }
    verdict = guards.agree(state.group, fields, what="the prompt check before a striped prefill",
                           timeout=state.options.timeout, error=error,
                           peer_error=lambda rank: RuntimeError(
                               f"rank {rank} of the context-parallel group refused its generate() inputs (its error "
                               "says why), so this rank stops too"))
    differing = verdict.differing()
    if differing:
        raise ValueError(
            f"the ranks of the context-parallel group called generate() with different {', '.join(differing)}: call "
            "it on every rank with the same prompt and the same settings (only a streamer may differ)"
        )


def _decode_inputs(kwargs, cache: StripedCache, state: ContextParallelState) -> dict:
    x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if x is None or x.shape[1] != 1:
        raise NotImplementedError(
            f"decoding on a StripedCache takes one new token per step; got {None if x is None else x.shape[1]} "
            "(assisted or speculative decoding is not supported inside hf_striped.context_parallel)"
        )
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.all()):
        raise ValueError("decoding inside hf_striped.context_parallel takes no padding (attention_mask all ones)")
    kwargs["attention_mask"] = None
    kwargs["position_ids"] = torch.full((x.shape[0], 1), cache.length, dtype=torch.long, device=x.device)
    cache.step_tokens = kwargs.get("input_ids")
    return kwargs


def _after_decoder(module, args, kwargs, output):
    _, cache = _cache_kwarg(kwargs)
    state = active_context()
    if not isinstance(cache, StripedCache) or state is None:
        return None
    state.generation_cache = None
    if cache.phase == _DECODE:
        cache.length += 1
        return None
    if cache.phase != _PREFILL:
        return None
    hidden = output.last_hidden_state
    n, P = cache.prompt_length, cache.world_size
    owner, index = (n - 1) % P, (n - 1) // P
    last = hidden[:, index:index + 1] if cache.rank == owner else torch.zeros_like(hidden[:, :1])
    # the last prompt token's hidden state, from its rank to all: a sum with zeros is exact
    last = guards.all_reduce(last.contiguous(), cache.group, what="sharing the prompt's last hidden state",
                             timeout=cache.timeout)
    output.last_hidden_state = last
    keep = max(0, -(-(n - cache.rank) // P))  # this rank's prompt positions rank, rank + P, ... < n
    for layer in cache.layers:
        layer.keep_first(keep)
    cache.length, cache.phase = n, _DECODE
    return output


# ---------------------------------------------------------------------------------------------
# Decode attention: the new token's query against this rank's shard, merged over the group


def decoding_cache(state: ContextParallelState | None):
    """The StripedCache being decoded on in this context, if an attention call is a decode step."""
    cache = getattr(state, "generation_cache", None)
    return cache if cache is not None and cache.phase == _DECODE else None


def _local_partial(query, key, value, positions, t: int, scale: float, softcap, window):
    """This rank's share of the decode query's attention: ``(out [b, 1, h, d], lse [b, h, 1])``
    in float32 (``lse`` -inf and ``out`` 0 where the shard holds no visible key)."""
    b, h, q_len, d = query.shape
    hk = key.shape[1]
    q = query.float().reshape(b, hk, h // hk, q_len, d)
    s = torch.einsum("bkgqd,bknd->bkgqn", q, key.float()) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if window is not None:  # Transformers' convention: keys p with t - p < window
        s = s.masked_fill((positions <= t - window).view(1, 1, 1, 1, -1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [b, hk, g, q]
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.einsum("bkgqn,bknd->bkgqd", p, value.float())
    return out.reshape(b, h, q_len, d).transpose(1, 2), lse.reshape(b, h, q_len)


def decode_attention(module, query, key, value, cache: StripedCache, *, scale: float, softcap=None, sinks=None,
                     window: int | None = None, name: str = "attention") -> torch.Tensor:
    """The exact attention of one decoded token over the whole group's cache: this rank's
    partial, one all-gather, the log-sum-exp merge in rank order; ``[b, 1, h, d]``."""
    t = cache.length
    positions = cache.positions(module.layer_idx, device=key.device)
    out, lse = _local_partial(query, key, value, positions, t, scale, softcap, window)
    b, q_len, h, d = out.shape
    tokens = cache.step_tokens
    header = torch.tensor([float(t)], device=out.device).expand(b, 1)
    if tokens is not None:
        header = torch.cat([header, tokens.to(out.device, torch.float32).reshape(b, -1)], dim=1)
    packed = torch.cat([out.reshape(b, -1), lse.reshape(b, -1), header], dim=1)
    parts = guards.all_gather(packed.to(guards.collective_device(cache.group)), cache.group,
                              what=f"the decode merge of {name} (position {t})", timeout=cache.timeout)
    if cache.checked_step != t:  # the header is the same at every layer: compare it once per step
        _check_step(parts, header.shape[1], t)
        cache.checked_step = t
    acc_out = torch.zeros_like(out)
    acc_lse = torch.full_like(lse, float("-inf"))
    split = q_len * h * d
    for part in parts:
        part = part.to(out.device)
        merge_(acc_out, acc_lse, part[:, :split].reshape(out.shape), part[:, split:split + h * q_len].reshape(lse.shape))
    if sinks is not None:
        acc_out, acc_lse = _apply_sinks(acc_out, acc_lse, sinks)
    if window is not None:  # later queries (position t + 1 on) see positions from t + 2 - window
        cache.layers[module.layer_idx].drop_before(t + 2 - window)
    return acc_out.to(query.dtype)


def _check_step(parts, width: int, t: int) -> None:
    """Every rank sees every rank's header (step, input tokens), so all reach one verdict."""
    heads = [p[:, -width:].cpu() for p in parts]
    bad = [r for r, x in enumerate(heads) if not torch.equal(x, heads[0])]
    if bad:
        raise RuntimeError(
            f"the ranks of the context-parallel group are decoding different tokens at position {t} (rank "
            f"{bad[0]} differs from rank 0): give every rank the same prompt and settings, and seed sampling alike "
            "on every rank (transformers.set_seed(seed) before generate())"
        )
