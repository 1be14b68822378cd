"""Turn a global batch into one context-parallel rank's part of it.

Every rank of a CP group collates the *same* global batch (the data loader is sharded over data
parallel groups only, see ``ContextParallel.prepare_dataloader``) and keeps its stripe:

1. rows are right-padded to a common length that the layout can split (pad id, label -100);
2. labels are shifted **once, on the full sequence** (``shift_labels[t] = labels[t + 1]``), so a
   token's target is right even when it lives on another rank;
3. global ``position_ids`` are built;
4. input ids, positions and shifted labels are striped for this rank.

Right padding needs no attention mask under causal attention: a pad token is only ever seen by
later pad tokens, whose labels are -100. Left padding cannot be exact that way (real tokens would
attend to pads), so it is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.layout import LAYOUTS, shard_local, split_multiple

IGNORE_INDEX = -100
FINGERPRINT_KEY = "cp_fingerprint"
"""Batch key carrying :func:`batch_fingerprint` of the global batch; popped before the forward."""

# Odd 61-bit multiplier for the fingerprint: products wrap modulo 2**64 in int64 arithmetic,
# which is deterministic on every device, and a single changed token changes the sum.
_MIX = 0x1FFFFFFFFFFFFFB


def batch_fingerprint(input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """A cheap int64 ``[4]`` summary of a global batch (shape and two position-weighted sums of
    its ids and labels). Ranks of one CP group compare fingerprints to catch batches that differ
    between them, which would otherwise train on garbage without any error."""
    ids = input_ids.to(torch.int64).flatten()
    w = torch.arange(1, ids.numel() + 1, dtype=torch.int64, device=ids.device) * _MIX
    lab = ids if labels is None else labels.to(torch.int64).flatten()
    return torch.stack(
        [
            torch.tensor(input_ids.shape[0], device=ids.device),
            torch.tensor(input_ids.shape[-1], device=ids.device),
            (ids * w).sum(),
            ((lab + 101) * w.flip(0)).sum(),
        ]
    )


def _as_tensor_rows(rows: Sequence[Any], key: str) -> list[torch.Tensor]:
    out = []
    for i, row in enumerate(rows):
        t = torch.as_tensor(row)
        if t.dim() != 1:
            raise ValueError(f"feature {i}: {key!r} must be one sequence of token ids, got shape {tuple(t.shape)}")
        out.append(t.to(torch.long))
    return out


def _stack_padded(rows: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


@dataclass(kw_only=True)
class StripingCollator:
    """Collate a global batch and return this context-parallel rank's stripe of it.

    Accepts plain tokenized rows (``{"input_ids": [...], "labels": [...]?, "attention_mask": [...]?}``,
    e.g. from a ``datasets`` dataset) or, with ``base_collator``, whatever a Transformers collator
    (``DataCollatorForLanguageModeling(mlm=False)``, ``DataCollatorWithPadding``, ...) makes of them.

    Returns ``input_ids``, ``position_ids``, ``labels`` and ``shift_labels`` (the same already
    shifted tensor: Transformers' causal-LM loss does not shift again when ``shift_labels`` is
    given, and the Trainer counts tokens from it), each ``[batch, seq_local]``, plus
    ``cp_fingerprint`` (see :func:`batch_fingerprint`).
    """

    cp_rank: int
    """This process's rank in its context-parallel group."""
    cp_size: int
    """Ranks in the context-parallel group (P)."""
    layout: str = "striped"
    """Token layout over the group (``hf_striped.LAYOUTS``)."""
    pad_token_id: int = 0
    """Id used for padding (never trained on: its labels are -100)."""
    base_collator: Callable[[list], Mapping[str, Any]] | None = None
    """Optional collator applied first to the list of features."""
    pad_to_multiple_of: int = 1
    """Extra alignment of the padded length (it is always a multiple of what the layout needs)."""
    max_length: int | None = None
    """Refuse global sequences longer than this (e.g. the model's ``max_position_embeddings``)."""
    pad_ragged: bool = True
    """Right-pad rows of different lengths; ``False`` makes ragged rows an error."""

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.cp_size < 1 or not 0 <= self.cp_rank < self.cp_size:
            raise ValueError(f"cp_rank must be in [0, cp_size); got cp_rank={self.cp_rank}, cp_size={self.cp_size}")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")

    @property
    def multiple(self) -> int:
        """The padded global length is a multiple of this."""
        return math.lcm(split_multiple(self.layout, self.cp_size), self.pad_to_multiple_of)

    def global_batch(self, features: list) -> dict[str, torch.Tensor]:
        """The padded, shifted global batch before striping: ``input_ids``, ``shift_labels``,
        ``position_ids``, each ``[batch, N]``."""
        if not features:
            raise ValueError(
                "empty batch: the collator got no rows. Check that the dataset is not empty and that the "
                "data loader gives every rank rows (ContextParallel.prepare_dataloader; drop_last=True if the "
                "last batch can come up empty)"
            )
        if self.base_collator is not None:
            batch = dict(self.base_collator(features))
            ids_rows = list(torch.as_tensor(batch["input_ids"]))
            lab = batch.get("labels")
            lab_rows = None if lab is None else list(torch.as_tensor(lab))
            mask = batch.get("attention_mask")
            mask_rows = None if mask is None else list(torch.as_tensor(mask))
        else:
            if not isinstance(features[0], Mapping) or "input_ids" not in features[0]:
                raise ValueError("each feature must be a mapping with 'input_ids' (tokenize the dataset first)")
            ids_rows = _as_tensor_rows([f["input_ids"] for f in features], "input_ids")
            lab_rows = _as_tensor_rows([f["labels"] for f in features], "labels") if "labels" in features[0] else None
            mask_rows = (
                _as_tensor_rows([f["attention_mask"] for f in features], "attention_mask")
                if "attention_mask" in features[0]
                else None
            )
        ids_rows = [torch.as_tensor(r).to(torch.long) for r in ids_rows]
        lengths = [r.numel() for r in ids_rows]
        if mask_rows is not None:  # keep only the real tokens; refuse left (or inner) padding
            kept = []
            for i, (r, m) in enumerate(zip(ids_rows, mask_rows)):
                m = torch.as_tensor(m).to(torch.bool)
                real = int(m.sum())
                if not bool(m[:real].all()):
                    raise ValueError(
                        f"row {i} is not right-padded (its attention_mask has zeros before ones). Context "
                        "parallelism keeps causal attention exact only with right padding: set "
                        "tokenizer.padding_side = 'right' (or leave rows unpadded and let this collator pad them)."
                    )
                kept.append(real)
            lengths = kept
        if lab_rows is not None:
            for i, (r, lab_r) in enumerate(zip(ids_rows, lab_rows)):
                if torch.as_tensor(lab_r).numel() != r.numel():
                    raise ValueError(f"row {i}: labels has {len(lab_r)} entries but input_ids has {r.numel()}")
        if not self.pad_ragged and len(set(lengths)) > 1:
            raise ValueError(
                f"rows have different lengths {sorted(set(lengths))} and pad_ragged=False: pack the dataset "
                "into fixed-length rows or set pad_ragged=True"
            )
        if max(lengths) == 0:
            raise ValueError(
                "every row of the batch is empty: filter out empty rows before training, e.g. "
                "dataset.filter(lambda row: len(row['input_ids']) > 1)"
            )
        longest = max(lengths)
        n = -(-longest // self.multiple) * self.multiple
        if self.max_length is not None and n > self.max_length:
            raise ValueError(
                f"the batch needs {n} positions ({longest} tokens padded to a multiple of {self.multiple}) but "
                f"the model has only {self.max_length} (max_position_embeddings): truncate or pack rows to at "
                f"most {self.max_length // self.multiple * self.multiple} tokens"
            )
        input_ids = _stack_padded([r[:k] for r, k in zip(ids_rows, lengths)], n, self.pad_token_id)
        if lab_rows is None:
            labels = _stack_padded([r[:k] for r, k in zip(ids_rows, lengths)], n, IGNORE_INDEX)
        else:
            labels = _stack_padded([torch.as_tensor(r).to(torch.long)[:k] for r, k in zip(lab_rows, lengths)], n, IGNORE_INDEX)
        shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        position_ids = torch.arange(n).expand(len(ids_rows), -1)
        return dict(input_ids=input_ids, shift_labels=shift_labels, position_ids=position_ids)

    def stripe(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a :meth:`global_batch` (contiguous tensors)."""
        part = {
            key: shard_local(batch[key], 1, self.layout, self.cp_rank, self.cp_size).contiguous()
            for key in ("input_ids", "position_ids", "shift_labels")
        }
        part["labels"] = part["shift_labels"]
        part[FINGERPRINT_KEY] = batch_fingerprint(batch["input_ids"], batch["shift_labels"])
        return part

    def __call__(self, features: list) -> dict[str, torch.Tensor]:
        return self.stripe(self.global_batch(features))
