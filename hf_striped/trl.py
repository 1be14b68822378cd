"""TRL's ``SFTTrainer`` (and PEFT adapters through it) with exact context parallelism.

    import hf_striped
    from hf_striped.trl import StripedSFTConfig, StripedSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="striped_ring")
    args = StripedSFTConfig(output_dir="out", cp_size=2, packing=True, max_length=4096, ...)
    trainer = StripedSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                peft_config=LoraConfig(...))  # or a peft.get_peft_model(...) model
    trainer.train()
    trainer.accelerator.end_training()  # destroy the process groups before Python exits (gloo)

launched with ``accelerate launch`` / ``torchrun`` on a multiple of ``cp_size`` processes. Needs the
``trl`` extra (``pip install "hf-striped[trl]"``: TRL 1.16 and PEFT 0.21, the versions tested);
``import hf_striped`` never imports TRL.

How it works. TRL prepares the dataset as usual (plain text, prompt-completion, conversational
through the chat template; ``completion_only_loss`` and ``assistant_only_loss`` become -100
labels during preparation; ``packing`` bins documents into rows with their ``seq_lengths``), and
builds its collator. After ``SFTTrainer.__init__`` (TRL refuses a custom collator in padding-free
mode, so it cannot be passed in) that collator is wrapped in hf_striped's ``StripingCollator``:
every rank of a CP group collates the same global batch, shifts the labels once on the whole
sequence, and keeps its stripe; packed and padding-free rows keep their document boundaries
(``cu_seq_lens``). TRL's loss already takes pre-shifted ``shift_labels`` and divides by the
token count of the whole step over all processes, so the loss runs unchanged inside the CP
context (:class:`~hf_striped.training.trainer.ContextParallelTrainerMixin`, shared with
``StripedTrainer``). Evaluation sums each batch's losses, targets, entropies and correct
predictions over the CP group before dividing. So under CP (and data-parallel replicas x CP):

* ``loss``, ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` (training), and ``eval_loss``,
  ``eval_entropy``, ``eval_mean_token_accuracy`` equal one process's on the same global batches
  (``num_tokens`` counts the real tokens of the global batch, as TRL's collator would, not the
  padding the striping adds);
* the gradients equal one process's, for full fine-tuning and for PEFT adapters (LoRA and other
  weight adapters); ``save_model`` writes a normal PEFT adapter folder, and ``merge_and_unload``
  works as usual.

Refused under ``cp_size > 1`` (a ``ValueError`` at construction that names the fix, never a
silently different loss), because TRL or PEFT would compute them from one rank's part of a
sequence:

* ``label_smoothing_factor > 0``: TRL's label smoother shifts the labels again;
* ``compute_loss_func``: it gets each rank's logits and already shifted labels;
* ``compute_metrics`` / ``preprocess_logits_for_metrics``: the logits live on several ranks;
* ``neftune_noise_alpha``: the noise scale depends on the (local) sequence length;
* a MoE router auxiliary loss (``router_aux_loss_coef``, on by default for MoE models): a nonlinear
  function of the routing statistics of the whole sequence;
* prompt-learning PEFT (prompt/prefix/P-tuning, CPT) and aLoRA (``alora_invocation_tokens``): they
  add virtual tokens to, or search, each rank's stripe as if it were the sequence;
* ``use_liger_kernel`` and ``activation_offloading``: never run under CP (Liger replaces the
  model's layer kernels that hf_striped's family patches use; offloading hooks saved tensors);
* ``train_sampling_strategy="batch_rebalance"``: its sampler gives every process its own batches;
* vision datasets: only text is striped.

Allowed: ``packing`` (``bfd``, ``bfd_split``, ``wrapped``), ``padding_free``, ``pad_to_multiple_of``,
``eval_packing``, ``loss_type="dft"`` (evaluation reports the DFT loss too, as SFTTrainer does),
``completion_only_loss``, ``assistant_only_loss``, ``gradient_checkpointing`` (its recomputation
finds the ring). The tests compare bfd packing, padding-free rows (with ``pad_to_multiple_of``),
right-padded rows, DFT, unpacked evaluation of a packed run, completion-only and assistant-only
masks with one process; ``bfd_split`` and ``wrapped`` reach the same collator paths (documents,
padded rows) but are not in the tests. Dropout (``lora_dropout``) is allowed but random: the ranks
of a CP group draw the same masks for their stripes, as data-parallel replicas do.

``num_tokens`` with ``pad_to_multiple_of`` in padding-free mode counts TRL's padding, as the stock
trainer does. Transformers' own ``include_num_input_tokens_seen="all"`` (off by default) sums the
ranks' stripes, so it also counts the few pads the striping adds.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from .training.data import StripingCollator
from .training.trainer import ROWS_KEY, ContextParallelArguments, ContextParallelTrainerMixin

__all__ = ["StripedSFTConfig", "StripedSFTTrainer"]

TOKENS_KEY = "cp_num_tokens"
"""Batch key: the real tokens of the global batch (TRL's ``num_tokens`` metric); popped before the
forward."""


def _config_refusals(args: Any) -> list[str]:
    """What in an ``SFTConfig`` cannot be exact under context parallelism, each with its fix."""
    out = []
    if getattr(args, "label_smoothing_factor", 0) > 0:
        out.append(
            f"label_smoothing_factor={args.label_smoothing_factor}: TRL's label smoother shifts the labels, "
            "which are already shifted for the whole sequence under CP, so every token would get the wrong "
            "target. Set label_smoothing_factor=0.0"
        )
    if getattr(args, "neftune_noise_alpha", None) is not None:
        out.append(
            f"neftune_noise_alpha={args.neftune_noise_alpha}: NEFTune scales its noise by 1/sqrt(sequence "
            "length), and each rank sees only its stripe, so the noise would be sqrt(cp_size) times larger. "
            "Set neftune_noise_alpha=None"
        )
    coef = getattr(args, "router_aux_loss_coef", None)
    if coef:
        out.append(
            f"router_aux_loss_coef={coef}: the MoE load-balancing loss is a nonlinear function of the "
            "routing statistics of the whole sequence, and each rank sees only its stripe. Set "
            "router_aux_loss_coef=0.0"
        )
    if getattr(args, "use_liger_kernel", False):
        out.append(
            "use_liger_kernel=True: Liger replaces the model's RoPE/RMSNorm/MLP kernels, which hf_striped's "
            "family patches rely on, and was never run under CP. Set use_liger_kernel=False"
        )
    if getattr(args, "activation_offloading", False):
        out.append(
            "activation_offloading=True: TRL's saved-tensor offloading was never run with the ring's "
            "backward (untested, so refused). Set activation_offloading=False (gradient_checkpointing=True "
            "saves activation memory and works under CP)"
        )
    if getattr(args, "train_sampling_strategy", None) == "batch_rebalance":
        out.append(
            "train_sampling_strategy='batch_rebalance': its sampler deals different batches to every "
            "process, but the ranks of a CP group must share theirs. Use train_sampling_strategy='random' "
            "(or 'group_by_length')"
        )
    return out


def _peft_refusals(peft_config: Any) -> list[str]:
    """What in a PEFT config cannot be exact under context parallelism, each with its fix."""
    if peft_config is None:
        return []
    if getattr(peft_config, "is_prompt_learning", False):
        kind = getattr(peft_config, "peft_type", type(peft_config).__name__)
        kind = getattr(kind, "value", kind)
        return [
            f"a prompt-learning PEFT adapter ({kind}): PEFT prepends its virtual tokens (or their key/value "
            "cache) to each rank's stripe as if it were the whole sequence. Use a weight adapter such as "
            "peft.LoraConfig instead"
        ]
    if getattr(peft_config, "alora_invocation_tokens", None) is not None:
        return [
            "an aLoRA adapter (alora_invocation_tokens): PEFT searches each rank's stripe for the invocation "
            "tokens as if it were the whole sequence. Use plain LoRA (alora_invocation_tokens=None)"
        ]
    return []


_HOOK_REFUSALS = {
    "compute_loss_func": (
        "it would get each rank's logits and labels already shifted for the whole sequence. Leave the loss "
        "to SFTTrainer (loss_type='nll' or 'dft'), or subclass StripedSFTTrainer and override compute_loss"
    ),
    "compute_metrics": (
        "the logits live on several ranks, in striped order. Evaluate the loss, entropy and token accuracy "
        "SFTTrainer reports, or compute metrics on a one-process run"
    ),
    "preprocess_logits_for_metrics": (
        "the logits live on several ranks, in striped order. Drop it (it only feeds compute_metrics)"
    ),
}


def _raise(refusals: list[str], cp_size: int) -> None:
    if refusals:
        raise ValueError(
            f"cannot be exact under context parallelism (cp_size={cp_size}), each rank holding part of every "
            "sequence:\n- " + "\n- ".join(refusals) + "\n(or train with cp_size=1)"
        )


@dataclass
class StripedSFTConfig(ContextParallelArguments, SFTConfig):
    """TRL's ``SFTConfig`` plus the context-parallel settings of
    :class:`~hf_striped.training.trainer.StripedTrainingArguments` (``cp_size``, ``cp_layout``,
    ``cp_backend``, ``cp_timeout``, ``cp_check_finite``), validated the same way; with
    ``cp_size > 1`` the options that cannot be exact under CP are refused here already (see the
    module docstring)."""

    def __post_init__(self):
        super().__post_init__()
        if self.cp_size > 1:
            _raise(_config_refusals(self), self.cp_size)


@dataclass
class _SFTBatchCounts:
    """The striping collator plus what the stock ``SFTTrainer`` reads from an unstriped batch:
    the global batch's dataset rows (evaluation weighs each batch's loss by them) and its real
    tokens (TRL's ``num_tokens`` counts them from the padded batch, which CP ranks never see)."""

    striping: StripingCollator
    padding_free: bool
    pad_to_multiple_of: int | None

    def __call__(self, features: list) -> dict[str, torch.Tensor]:
        batch = self.striping(features)
        tokens = sum(len(f["input_ids"]) for f in features)
        if self.padding_free and self.pad_to_multiple_of:  # TRL's flattened row counts its padding too
            tokens = -(-tokens // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch[ROWS_KEY] = torch.tensor(len(features))
        batch[TOKENS_KEY] = torch.tensor(tokens)
        return batch


class StripedSFTTrainer(ContextParallelTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` whose training and evaluation run context-parallel when
    ``args.cp_size > 1`` (a :class:`StripedSFTConfig`); with ``cp_size=1`` (or a plain
    ``SFTConfig``) it is the stock trainer. Takes exactly ``SFTTrainer``'s arguments."""

    _cp_eval_extras = ("entropy", "mean_token_accuracy")

    def __init__(self, *args, **kwargs):
        given = inspect.signature(SFTTrainer.__init__).bind(self, *args, **kwargs).arguments
        cp_size = getattr(given.get("args"), "cp_size", 1)
        if cp_size > 1:  # before TRL prepares the dataset: fail fast
            refusals = _config_refusals(given["args"])
            refusals += [f"{name}: {why}" for name, why in _HOOK_REFUSALS.items()
                         if given.get(name) is not None]
            _raise(refusals + _peft_refusals(given.get("peft_config")), cp_size)
        super().__init__(*args, **kwargs)
        if cp_size > 1:
            self._refuse_after_init(cp_size)
        by_name = (" (a model given by name: "
                   "SFTConfig(model_init_kwargs={'attn_implementation': 'striped_ring'}))")
        self._setup_context_parallel(self.data_collator, pad_token_id=self._tokenizer.pad_token_id,
                                     model_hint=by_name)
        if self.cp.cp_size > 1:
            self.data_collator = _SFTBatchCounts(self.data_collator, padding_free=self.padding_free,
                                                 pad_to_multiple_of=self.args.pad_to_multiple_of)

    def _refuse_after_init(self, cp_size: int) -> None:
        """Refusals that need the model TRL built (an adapter added by ``peft_config``, a PEFT model
        passed in, a MoE config's default auxiliary loss) or the dataset's kind."""
        refusals = []
        peft_config = getattr(self.model, "peft_config", None)
        if isinstance(peft_config, dict):
            for cfg in peft_config.values():
                refusals += _peft_refusals(cfg)
        if self.aux_loss_enabled:
            refusals.append(
                f"the MoE router auxiliary loss (router_aux_loss_coef={self.router_aux_loss_coef}, the model "
                "config's default): it is a nonlinear function of the routing statistics of the whole "
                "sequence, and each rank sees only its stripe. Set router_aux_loss_coef=0.0 in the config"
            )
        if self._is_vision_dataset:
            refusals.append("a vision dataset: only text batches are striped. Train vision models without CP")
        _raise(refusals, cp_size)

    # -- loss ---------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        tokens = inputs.pop(TOKENS_KEY, None)
        counted = self._total_train_tokens
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if tokens is None:  # cp_size == 1: the stock trainer
            return result
        if self.model.training:
            # TRL counted this rank's stripe, padding included; count the global batch once per CP group
            mine = tokens if self.cp.cp_rank == 0 else torch.zeros_like(tokens)
            self._total_train_tokens = counted + int(self.accelerator.gather_for_metrics(mine).sum())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result

    # -- evaluation ---------------------------------------------------------------------------

    def _cp_eval_sums(self, model, inputs) -> list[torch.Tensor]:
        """TRL's fused LM head (no full logits): summed token losses (-log p, or DFT's -p log p),
        targets, entropies, top-1 hits."""
        inputs = {k: v for k, v in inputs.items() if k not in (TOKENS_KEY, "labels")}
        out = model(**inputs, use_cache=False, fused_lm_head=True)
        per_token = -out.log_probs
        if self.args.loss_type == "dft":  # the loss SFTTrainer.compute_loss reports, as in its own evaluation
            per_token = per_token * out.log_probs.exp()
        return [per_token.sum(), out.label_mask.sum(), out.entropy.sum(), out.is_top1.sum()]

    def _cp_eval_record(self, metric_key_prefix: str, means: dict[str, float]) -> dict[str, float]:
        # SFTTrainer.log adds its metrics (eval_entropy, ...) when evaluate() logs the results, as it does
        # for the stock loop, which appends them during compute_loss
        self._metrics["eval"]["entropy"] = [means["entropy"]]
        self._metrics["eval"]["mean_token_accuracy"] = [means["mean_token_accuracy"]]
        self._metrics["eval"]["num_tokens"] = [self._total_train_tokens]
        return {}
