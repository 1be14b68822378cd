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

**Packed documents** (padding-free): with ``packing=True``, rows carrying ``seq_lengths`` (the
documents of a pre-packed row), or a ``base_collator`` that flattens (Transformers'
``DataCollatorWithFlattening``), the global batch is *one* row of documents: positions restart
at 0 per document, no label crosses a document boundary, and only the row's end is padded (the
padding is its own last document). The row is sharded with its document boundaries
(``cu_seqlens``, which for ``striped`` place short documents whole on one rank), and the
boundaries travel with the batch as ``cu_seq_lens_q`` / ``cu_seq_lens_k``, so the model's
attention knows them without a collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.documents import check_cu_seqlens, places_documents, shard_placed
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


@dataclass
class _Rows:
    """A batch's rows of real tokens, their labels (``None``: the ids), and the document lengths
    of the one packed row they form (``None``: rows are padded separately)."""

    ids: list[torch.Tensor]
    labels: list[torch.Tensor] | None
    documents: list[int] | None


def _real_lengths(ids: list[torch.Tensor], mask: list | None) -> list[int]:
    """Each row's real tokens: all of them, or the leading ones its attention_mask keeps (left or
    inner padding is refused)."""
    if mask is None:
        return [r.numel() for r in ids]
    kept = []
    for i, m in enumerate(mask):
        m = torch.as_tensor(m).to(torch.bool)
        real = int(m.sum())
        if not bool(m[:real].all()):
            raise ValueError(
                f"row {i} is not right-padded (its attention_mask has zeros before ones). Context "
                "parallelism keeps causal attention exact only with right padding: set "
                "tokenizer.padding_side = 'right' (or leave rows unpadded and let this collator pad them)."
            )
        kept.append(real)
    return kept


def _row_documents(features: list, packing: bool) -> list[int] | None:
    """Document lengths of the packed row plain rows form: each row's ``seq_lengths`` (a
    pre-packed row), or each row whole with ``packing``; ``None`` for separately padded rows."""
    if "seq_lengths" in features[0]:
        docs = []
        for i, f in enumerate(features):
            lengths = [int(x) for x in f["seq_lengths"]]
            if sum(lengths) != len(f["input_ids"]) or min(lengths, default=0) < 1:
                raise ValueError(
                    f"row {i}: seq_lengths {lengths[:5]}... must be positive and add up to its {len(f['input_ids'])} "
                    "tokens"
                )
            docs += lengths
        return docs
    return [len(f["input_ids"]) for f in features] if packing else None


def _flattened_documents(batch: Mapping[str, Any]) -> list[int] | None:
    """Document lengths of a flattening collator's one row (``DataCollatorWithFlattening``): from
    its ``cu_seq_lens_q`` or from where its ``position_ids`` restart at 0; ``None`` otherwise."""
    pos = batch.get("position_ids")
    if pos is None:
        return None
    pos = torch.as_tensor(pos)
    if pos.dim() != 2 or pos.shape[0] != 1:
        return None
    cu = batch.get("cu_seq_lens_q")
    if cu is not None:
        bounds = check_cu_seqlens(torch.as_tensor(cu), pos.shape[1])
    else:
        starts = (pos[0] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            raise ValueError("the base collator's position_ids must start at 0 (they restart at 0 per document)")
        bounds = (*starts, pos.shape[1])
    return [b - a for a, b in zip(bounds, bounds[1:])]


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
    packing: bool = False
    """Concatenate the batch's rows into one packed row of documents (one document per row, or
    per entry of a row's ``seq_lengths``); see the module docstring."""

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
        ``position_ids``, each ``[batch, N]`` (``[1, N]`` for packed documents, which add the
        boundaries ``cu_seqlens``)."""
        rows = self._rows(features)
        if rows.documents is not None:
            return self._packed_batch(rows)
        return self._padded_batch(rows)

    def _rows(self, features: list) -> _Rows:
        """The batch's rows (real tokens only), labels and documents, from the features or the base
        collator's output."""
        if not features:
            raise ValueError(
                "empty batch: the collator got no rows. Check that the dataset is not empty and that the "
                "data loader gives every rank rows (ContextParallel.prepare_dataloader; drop_last=True if the "
                "last batch can come up empty)"
            )
        if self.base_collator is not None:
            batch = dict(self.base_collator(features))
            get = lambda key: None if batch.get(key) is None else list(torch.as_tensor(batch[key]))  # noqa: E731
            ids, labels, mask = list(torch.as_tensor(batch["input_ids"])), get("labels"), get("attention_mask")
            documents = _flattened_documents(batch)
        else:
            if not isinstance(features[0], Mapping) or "input_ids" not in features[0]:
                raise ValueError("each feature must be a mapping with 'input_ids' (tokenize the dataset first)")
            rows = lambda key: _as_tensor_rows([f[key] for f in features], key) if key in features[0] else None  # noqa: E731
            ids, labels, mask = rows("input_ids"), rows("labels"), rows("attention_mask")
            documents = _row_documents(features, self.packing)
        ids = [torch.as_tensor(r).to(torch.long) for r in ids]
        if documents is not None and mask is not None and not all(bool(torch.as_tensor(m).all()) for m in mask):
            raise ValueError(
                "a padding-free row has padding tokens (its attention_mask has zeros): packed documents take no "
                "padding; give the flattening collator (or packing=True) unpadded rows, and this collator pads "
                "only the row's end, as a document of its own"
            )
        lengths = _real_lengths(ids, mask)
        if labels is not None:
            for i, (r, lab) in enumerate(zip(ids, labels)):
                if torch.as_tensor(lab).numel() != r.numel():
                    raise ValueError(f"row {i}: labels has {len(lab)} entries but input_ids has {r.numel()}")
            labels = [torch.as_tensor(lab).to(torch.long)[:k] for lab, k in zip(labels, lengths)]
        return _Rows([r[:k] for r, k in zip(ids, lengths)], labels, documents)

    def _padded_length(self, longest: int, what: str) -> int:
        n = -(-longest // self.multiple) * self.multiple
        if self.max_length is not None and n > self.max_length:
            raise ValueError(
                f"the batch needs {n} positions ({longest} tokens {what} padded to a multiple of {self.multiple}) but "
                f"the model has only {self.max_length} (max_position_embeddings): truncate or pack rows to at "
                f"most {self.max_length // self.multiple * self.multiple} tokens"
            )
        return n

    def _padded_batch(self, rows: _Rows) -> dict[str, torch.Tensor]:
        lengths = [r.numel() for r in rows.ids]
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
        n = self._padded_length(max(lengths), "in its longest row")
        input_ids = _stack_padded(rows.ids, n, self.pad_token_id)
        labels = _stack_padded(rows.ids if rows.labels is None else rows.labels, n, IGNORE_INDEX)
        shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        position_ids = torch.arange(n).expand(len(rows.ids), -1)
        return dict(input_ids=input_ids, shift_labels=shift_labels, position_ids=position_ids)

    def _packed_batch(self, rows: _Rows) -> dict[str, torch.Tensor]:
        """One row of the batch's documents; the padding to the layout's multiple is its own
        last document, and no document's last token predicts the next document's first."""
        ids = torch.cat(rows.ids)
        labels = ids if rows.labels is None else torch.cat(rows.labels)
        docs = [d for d in rows.documents if d]
        if sum(docs) != ids.numel() or not docs:
            raise ValueError(
                f"the batch's document lengths add up to {sum(docs)} but its rows hold {ids.numel()} tokens: "
                "seq_lengths (or the base collator's position_ids) must cover every token"
            )
        self._check_document_lengths(docs)
        n = -(-ids.numel() // self.multiple) * self.multiple
        if n > ids.numel():
            docs.append(n - ids.numel())
        bounds = [0]
        for length in docs:
            bounds.append(bounds[-1] + length)
        input_ids = torch.full((1, n), self.pad_token_id, dtype=torch.long)
        input_ids[0, : ids.numel()] = ids
        full = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
        full[: ids.numel()] = labels
        shift = torch.cat([full[1:], full.new_full((1,), IGNORE_INDEX)])
        shift[torch.tensor(bounds[1:], dtype=torch.long) - 1] = IGNORE_INDEX  # a document's last token: no target
        position_ids = torch.cat([torch.arange(length) for length in docs])[None]
        return dict(input_ids=input_ids, shift_labels=shift[None], position_ids=position_ids,
                    cu_seqlens=torch.tensor(bounds, dtype=torch.int32))

    def _check_document_lengths(self, docs: list[int]) -> None:
        if self.max_length is not None and max(docs) > self.max_length:
            raise ValueError(
                f"a packed document has {max(docs)} tokens, more than the model's {self.max_length} positions "
                f"(max_position_embeddings): truncate documents to at most {self.max_length} tokens before packing"
            )

    def stripe(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a :meth:`global_batch` (contiguous tensors); a packed row's part
        follows its documents (``cu_seqlens``), which travel as ``cu_seq_lens_q`` / ``_k``."""
        cu = batch.get("cu_seqlens")
        bounds = None if cu is None else check_cu_seqlens(cu, batch["input_ids"].shape[1])
        placed = places_documents(self.layout, self.cp_size, bounds)
        part = {
            key: (shard_placed(batch[key], 1, self.layout, self.cp_rank, self.cp_size, bounds) if placed
                  else shard_local(batch[key], 1, self.layout, self.cp_rank, self.cp_size)).contiguous()
            for key in ("input_ids", "position_ids", "shift_labels")
        }
        part["labels"] = part["shift_labels"]
        if cu is not None:
            part["cu_seq_lens_q"] = part["cu_seq_lens_k"] = cu
        part[FINGERPRINT_KEY] = batch_fingerprint(batch["input_ids"], batch["shift_labels"])
        return part

    def __call__(self, features: list) -> dict[str, torch.Tensor]:
        return self.stripe(self.global_batch(features))
