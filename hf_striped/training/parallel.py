"""Data-parallel x context-parallel training on the current ``torch.distributed`` world.

``ContextParallel(cp_size)`` splits the W processes into W / cp_size data-parallel replicas of a
CP group of ``cp_size`` consecutive ranks (a ``("dp_replicate", "cp")`` device mesh, the dimension
names Accelerate's data loader understands). Consecutive ranks share a node under every launcher,
so the ring's per-layer K/V traffic stays on the fast intra-node links; only the once-per-step
gradient all-reduce crosses nodes.

Exact loss (the conventions of Transformers' ``ForCausalLMLoss``): every rank computes
``sum(token losses on its stripe) / num_items_in_batch`` where ``num_items_in_batch`` is the number
of non-ignored target tokens of the *whole* optimizer step (every rank, every replica, every
gradient-accumulation micro-batch). The model is replicated on all W ranks (DDP / FSDP over the
world), whose gradient reduction *averages* over W; so the loss handed to ``backward`` is that
value times W, and the averaged gradient is exactly the gradient of the global token mean, as
on one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..integration.context import context_parallel
from .data import FINGERPRINT_KEY, IGNORE_INDEX, StripingCollator
from ..core.guards import agree, reduce_host
from ..core.options import RingOptions, build_options
from ..core.sharding import unshard


def check_cp_size(cp_size: int, world_size: int) -> None:
    """Raise a ``ValueError`` that says how to fix a CP size the world cannot be split by."""
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive integer, got {cp_size!r}")
    if world_size % cp_size:
        fits = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"cp_size={cp_size} does not divide the world size {world_size}: launch a multiple of {cp_size} "
            f"processes (e.g. --num_processes {cp_size * max(1, world_size // cp_size)}) or choose cp_size "
            f"from {fits}"
        )


class ContextParallel:
    """Process groups, data, loss and output helpers for context-parallel training.

    Args:
        cp_size: ranks per context-parallel group; must divide the world size.
        layout, backend, timeout, check_finite: the fields of :class:`hf_striped.RingOptions`
            (or pass ``options``). ``timeout`` bounds the ring and these helpers' collectives;
            set the process group's own timeout (``init_process_group(timeout=)``, Accelerate's
            ``InitProcessGroupKwargs``) to bound the data-parallel gradient all-reduce as well.
            Set :attr:`train_step` as training advances and NaN/Inf errors name the step.
        options: a :class:`hf_striped.RingOptions` instead of those four.
        check_batches: compare a fingerprint of every global batch across the CP group (one tiny
            agreement per micro-batch) and raise if ranks were given different batches.
        device_type: ``"cpu"`` or ``"cuda"``; default: ``"cuda"`` if the process group is NCCL.
    """

    def __init__(
        self,
        cp_size: int = 1,
        *,
        layout: str | None = None,
        backend: str | None = None,
        check_batches: bool = True,
        device_type: str | None = None,
        timeout: float | None = None,
        check_finite: bool | None = None,
        options: RingOptions | None = None,
    ):
        self.options = build_options(options, layout=layout, backend=backend, timeout=timeout,
                                     check_finite=check_finite)
        self.check_batches = check_batches
        self.train_step: int | None = None
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if cp_size > 1 and not dist.is_initialized():
            raise RuntimeError(
                f"cp_size={cp_size} needs an initialised torch.distributed process group: launch with "
                "`accelerate launch` or `torchrun` (and create the Accelerator, or call "
                "torch.distributed.init_process_group, before ContextParallel)"
            )
        check_cp_size(cp_size, self.world_size)
        self.cp_size = cp_size
        self.dp_size = self.world_size // cp_size
        self.cp_rank, self.dp_rank = self.rank % cp_size, self.rank // cp_size
        self.mesh = self.cp_group = self.dp_group = None
        if self.world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            if device_type is None:
                device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
            self.mesh = init_device_mesh(device_type, (self.dp_size, cp_size), mesh_dim_names=("dp_replicate", "cp"))
            self.cp_group = self.mesh.get_group("cp")
            self.dp_group = self.mesh.get_group("dp_replicate")

    @property
    def layout(self) -> str:
        return self.options.layout

    @property
    def timeout(self) -> float:
        return self.options.timeout

    def __repr__(self) -> str:
        return (
            f"ContextParallel(world={self.world_size}, dp={self.dp_size} x cp={self.cp_size}, "
            f"rank={self.rank} (dp {self.dp_rank}, cp {self.cp_rank}), layout={self.layout!r})"
        )

    # -- data ---------------------------------------------------------------------------------

    def collator(self, **kwargs) -> StripingCollator:
        """A :class:`~hf_striped.training.data.StripingCollator` for this rank (kwargs go to it)."""
        return StripingCollator(cp_rank=self.cp_rank, cp_size=self.cp_size, layout=self.layout, **kwargs)

    def prepare_dataloader(self, dataloader, *, device=None, seed: int | None = None):
        """Shard ``dataloader`` over data-parallel replicas only, with Accelerate's
        ``prepare_data_loader``: every rank of a CP group gets the same global batches."""
        from accelerate.data_loader import prepare_data_loader

        return prepare_data_loader(
            dataloader,
            device=device,
            num_processes=self.dp_size,
            process_index=self.dp_rank,
            put_on_device=device is not None,
            use_seedable_sampler=True,
            data_seed=seed,
        )

    def check_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Drop the fingerprint from ``batch`` (the model must not see it) after checking that
        every rank of the CP group collated the same global batch."""
        batch = dict(batch)
        fp = batch.pop(FINGERPRINT_KEY, None)
        if self.check_batches and self.cp_size > 1:
            if fp is None:
                raise ValueError(
                    "batch has no cp_fingerprint: build batches with ContextParallel.collator() (or pass "
                    "check_batches=False if you stripe them yourself)"
                )
            verdict = agree(self.cp_group, {f"fingerprint {i}": int(x) for i, x in enumerate(fp.reshape(-1).tolist())},
                            what="hf_striped's check that the CP group's ranks hold the same batch",
                            timeout=self.timeout)
            if verdict.differing():
                raise ValueError(
                    f"ranks of one context-parallel group were given different batches (this is CP rank "
                    f"{self.cp_rank}). Every rank of a CP group must collate the same global batch: shard the "
                    "data loader over data-parallel replicas only (ContextParallel.prepare_dataloader) and seed "
                    "any shuffling identically on every rank."
                )
        return batch

    # -- loss ---------------------------------------------------------------------------------

    def num_items(self, batches: Iterable[Mapping[str, Any]]) -> torch.Tensor:
        """Non-ignored target tokens of one optimizer step over the whole world: the
        ``num_items_in_batch`` every rank divides its summed loss by."""
        total = sum(int(b["shift_labels"].ne(IGNORE_INDEX).sum()) for b in batches)
        t = reduce_host(torch.tensor(total, dtype=torch.int64), None, timeout=self.timeout,
                        what="hf_striped's count of the step's target tokens")
        if t.item() == 0:
            raise ValueError(
                "this optimizer step has no target tokens on any rank (every label is -100, or every row has a "
                "single token, which leaves nothing to predict after the shift): drop such rows before "
                "collating (e.g. dataset.filter(lambda row: len(row['input_ids']) > 1)) or check how the "
                "labels were masked"
            )
        return t

    @contextlib.contextmanager
    def context(self):
        """The block inside which ``striped_ring`` attention runs over this rank's CP group."""
        if self.cp_size == 1:
            yield None
            return
        with context_parallel(self.cp_group, options=self.options, train_step=self.train_step) as state:
            yield state

    def forward(self, model, batch: Mapping[str, Any], num_items_in_batch: torch.Tensor | int):
        """Run a causal LM on this rank's stripe; return ``(loss_for_backward, outputs)``.

        ``outputs.loss`` is this rank's share of the step's mean loss (summing it over the world
        and over micro-batches gives the loss one process reports); ``loss_for_backward`` is it
        times the world size, which the data-parallel gradient average turns back into the exact
        gradient.
        """
        batch = self.check_batch(batch)
        if not torch.is_tensor(num_items_in_batch):
            num_items_in_batch = torch.tensor(num_items_in_batch)
        with self.context():
            out = model(**batch, num_items_in_batch=num_items_in_batch, use_cache=False)
        return out.loss * self.world_size, out

    def reduce_sum(self, value: torch.Tensor | float, group: str = "world") -> torch.Tensor:
        """Sum a scalar over the world (or ``group="cp"``) without autograd (for logging)."""
        pg = self.cp_group if group == "cp" else None
        return reduce_host(torch.as_tensor(value, dtype=torch.float64), pg, timeout=self.timeout,
                           what="hf_striped's loss sum for logging")

    # -- outputs ------------------------------------------------------------------------------

    def gather(self, x: torch.Tensor, dim: int = 1, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """This CP group's full tensor in natural token order, on every rank of the group, from
        each rank's part (logits, hidden states, per-token losses: anything with a token dim).
        Differentiable. ``cu_seqlens``: the batch's ``cu_seq_lens_q`` for a packed row."""
        if self.cp_size == 1:
            return x
        return unshard(x, dim=dim, group=self.cp_group, layout=self.layout, timeout=self.timeout, cu_seqlens=cu_seqlens)

    def token_losses(self, logits: torch.Tensor, shift_labels: torch.Tensor,
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token losses ``[batch, N]`` of the whole CP group's sequences in natural order
        (0 at ignored targets), from this rank's logits and shifted labels (``cu_seqlens`` as in
        :meth:`gather`)."""
        local = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), shift_labels.flatten().to(logits.device), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(shift_labels.shape)
        return self.gather(local, dim=1, cu_seqlens=cu_seqlens)
