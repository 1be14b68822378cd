"""Hugging Face ``Trainer`` with context parallelism over ``striped_ring`` attention.

    args = StripedTrainingArguments(output_dir="out", cp_size=2, ...)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="striped_ring")
    trainer = StripedTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ev)
    trainer.train()
    trainer.accelerator.end_training()  # destroy the process groups before Python exits (gloo)

launched with ``accelerate launch`` / ``torchrun`` on a multiple of ``cp_size`` processes. What it
changes, and why (Transformers 5.x):

* data: batches are sharded over data-parallel replicas only (Accelerate's ``BatchSamplerShard``
  is told the replica count and index), and each rank's collator keeps its stripe of the global
  batch (:class:`hf_striped.training.data.StripingCollator`, on top of the ``data_collator`` you pass);
* loss: the Trainer's own ``num_items_in_batch`` path is already exact once the batch carries
  ``shift_labels`` (it counts target tokens over all processes and multiplies the loss by the
  process count before DDP averages gradients); we only run the forward inside the CP context;
* evaluation: each batch's loss is the mean over the *whole* sequence (summed over the CP group),
  so ``eval_loss`` equals the one-process value;
* Transformers' own CP path (``parallelism_config``) is SDPA-only and bypassed.

These parts live in :class:`ContextParallelTrainerMixin` and :class:`ContextParallelArguments`,
which ``hf_striped.trl`` reuses for TRL's ``SFTTrainer``.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import EvalLoopOutput

from .data import IGNORE_INDEX
from ..integration import ATTN_IMPLEMENTATION
from ..core.guards import reduce_host
from ..core.options import RingOptions
from .parallel import ContextParallel


ROWS_KEY = "cp_rows"
"""Optional batch key: how many dataset rows the global batch holds. Evaluation weighs each batch's
loss by it, as the stock loop weighs a batch by its examples (default: the batch's row count,
which is 1 for a padding-free row). Popped before the forward."""


@dataclass
class ContextParallelArguments:
    """The context-parallel settings, mixed into a ``TrainingArguments`` subclass
    (:class:`StripedTrainingArguments`, ``hf_striped.trl.StripedSFTConfig``): put it first in
    the bases so that its ``__post_init__`` validates after the arguments' own."""

    cp_size: int = field(default=1, metadata={"help": "Processes per context-parallel group; must divide the world size."})
    cp_layout: str = field(default="striped", metadata={"help": "Token layout: striped, contiguous or zigzag."})
    cp_backend: str = field(default="auto", metadata={"help": "Block kernel (hf_striped.kernels.BACKENDS)."})
    cp_timeout: float | None = field(default=None, metadata={
        "help": "Seconds a rank waits for a ring peer before raising (default: HF_STRIPED_TIMEOUT, else 600). "
                "ddp_timeout bounds the other collectives."})
    cp_check_finite: bool | None = field(default=None, metadata={
        "help": "Check every attention block for NaN/Inf (default: HF_STRIPED_CHECK_FINITE, else off)."})

    def __post_init__(self):
        super().__post_init__()
        # validated here, once, so a bad setting fails when the arguments are built
        self.cp_options = RingOptions(layout=self.cp_layout, backend=self.cp_backend, timeout=self.cp_timeout,
                                      check_finite=self.cp_check_finite)
        if self.cp_size > 1 and not self.average_tokens_across_devices:
            raise ValueError(
                "cp_size > 1 needs average_tokens_across_devices=True: each rank holds only part of every "
                "sequence, so the loss must be normalised by the token count over all processes"
            )


@dataclass
class StripedTrainingArguments(ContextParallelArguments, TrainingArguments):
    """``TrainingArguments`` plus the context-parallel settings."""


class ContextParallelTrainerMixin:
    """The context-parallel parts of a ``Trainer`` subclass, shared by :class:`StripedTrainer` and
    ``hf_striped.trl.StripedSFTTrainer``: data sharded over data-parallel replicas only, the
    striping collator, the loss computed inside the CP context, and an exact evaluation loop.

    Put it first in the bases (``class T(ContextParallelTrainerMixin, Trainer)``) and call
    :meth:`_setup_context_parallel` at the end of ``__init__`` with the collator whose batches are
    to be striped. Subclasses may add per-token metrics to evaluation (:attr:`_cp_eval_extras`,
    :meth:`_cp_eval_sums`, :meth:`_cp_eval_record`).
    """

    cp: ContextParallel
    _cp_eval_extras: tuple[str, ...] = ()
    """Names of the per-token sums :meth:`_cp_eval_sums` returns after the loss and target count."""

    def _setup_context_parallel(self, base_collator, pad_token_id: int | None = None,
                                model_hint: str = "") -> None:
        """Build :attr:`cp` from the arguments; for ``cp_size > 1`` check the model's attention and
        stripe ``base_collator``'s batches (``None``: plain tokenized rows)."""
        a = self.args
        self.cp = ContextParallel(getattr(a, "cp_size", 1), options=getattr(a, "cp_options", None))
        if self.cp.cp_size == 1:
            return
        config = self.model.config
        if config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"cp_size={self.cp.cp_size} needs the model loaded with attn_implementation={ATTN_IMPLEMENTATION!r} "
                f"(got {config._attn_implementation!r}): import hf_striped, then from_pretrained(..., "
                f"attn_implementation={ATTN_IMPLEMENTATION!r}){model_hint}"
            )
        pad = pad_token_id
        if pad is None:
            pad = getattr(config, "pad_token_id", None)
        if pad is None and self.processing_class is not None:
            pad = getattr(self.processing_class, "pad_token_id", None)
        self.data_collator = self.cp.collator(
            pad_token_id=pad if pad is not None else 0,
            base_collator=base_collator,
            max_length=getattr(config, "max_position_embeddings", None),
        )

    # -- data ---------------------------------------------------------------------------------

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, dataloader_key=None):
        loader = super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        if self.cp.cp_size > 1:  # shard over data-parallel replicas, not over every process
            for shard in (getattr(loader, "batch_sampler", None), getattr(loader, "dataset", None)):
                if hasattr(shard, "num_processes") and hasattr(shard, "process_index"):
                    shard.num_processes, shard.process_index = self.cp.dp_size, self.cp.dp_rank
                    if not is_training and hasattr(shard, "even_batches"):
                        # no rows repeated to even out the last batches: each replica evaluates
                        # exactly the one-process batches g = dp_rank, dp_rank + dp, ...
                        shard.even_batches = False
        return loader

    def _prepare_context_parallel_inputs(self, model, inputs):
        return contextlib.nullcontext, inputs  # Transformers' SDPA-only CP path is not used

    # -- loss ---------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.cp.cp_size == 1:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        inputs = self.cp.check_batch(inputs)
        inputs.pop(ROWS_KEY, None)
        self.cp.train_step = self.state.global_step + 1  # named by the NaN/Inf guard
        with self.cp.context():
            return super().compute_loss(model, {**inputs, "use_cache": False}, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _cp_eval_sums(self, model, inputs) -> list[torch.Tensor]:
        """This rank's part of one evaluation batch: the summed token losses, the number of
        targets, then one sum per name in :attr:`_cp_eval_extras` (runs inside the CP context)."""
        labels = inputs["shift_labels"]
        docs = {k: inputs[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k") if k in inputs}
        logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False,
                       **docs).logits
        loss_sum = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return [loss_sum, labels.ne(IGNORE_INDEX).sum()]

    def _cp_eval_record(self, metric_key_prefix: str, means: dict[str, float]) -> dict[str, float]:
        """Metrics to report besides the loss, from each extra's mean over evaluation batches."""
        return {f"{metric_key_prefix}_{name}": value for name, value in means.items()}

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        if self.cp.cp_size == 1:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.compute_metrics is not None:
            raise NotImplementedError(
                "compute_metrics with cp_size > 1 is not supported yet (predictions live on several ranks); "
                "evaluate the loss only, or compute metrics on logits gathered with trainer.cp.gather(...)"
            )
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        # sum over rows of each row's batch-mean loss, rows, batches, then the sum over batches of
        # each extra's batch mean (the loss is weighed per row and the extras per batch, as the
        # stock loops do)
        total = torch.zeros(3 + len(self._cp_eval_extras), dtype=torch.float64)
        for inputs in dataloader:
            inputs = self.cp.check_batch(self._prepare_inputs(inputs))
            rows = inputs.pop(ROWS_KEY, None)
            rows = inputs["shift_labels"].shape[0] if rows is None else int(rows)
            with torch.no_grad(), self.compute_loss_context_manager(), self.cp.context():
                sums = self._cp_eval_sums(model, inputs)
            both = reduce_host(torch.stack([s.detach().double() for s in sums]),
                               self.cp.cp_group, timeout=self.cp.timeout,
                               what="hf_striped's evaluation loss sum over the CP group")  # whole sequences
            batch = [both[0] / both[1].clamp_min(1) * rows, torch.tensor(rows, dtype=torch.float64),
                     torch.tensor(1.0, dtype=torch.float64)]
            batch += [s / both[1] if both[1] > 0 else torch.zeros((), dtype=torch.float64) for s in both[2:]]
            total += torch.stack(batch)
        if self.cp.dp_size > 1:
            total = reduce_host(total, self.cp.dp_group, timeout=self.cp.timeout,
                                what="hf_striped's evaluation loss sum over data-parallel replicas")
        metrics = {f"{metric_key_prefix}_loss": float(total[0] / total[1].clamp_min(1))}
        means = {name: float(s / total[2].clamp_min(1)) for name, s in zip(self._cp_eval_extras, total[3:])}
        metrics.update(self._cp_eval_record(metric_key_prefix, means))
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=int(total[1]))


class StripedTrainer(ContextParallelTrainerMixin, Trainer):
    """A ``Trainer`` whose training and evaluation run context-parallel when ``args.cp_size > 1``."""

    def __init__(self, *args, **kwargs):
        # the caller's collator, however it was passed (Trainer substitutes a default for None)
        user_collator = inspect.signature(Trainer.__init__).bind(self, *args, **kwargs).arguments.get("data_collator")
        super().__init__(*args, **kwargs)
        self._setup_context_parallel(user_collator)
