"""Training text as a ``datasets.Dataset`` of token rows: packed into fixed-length rows (with their
documents' boundaries, or plainly concatenated)
(:func:`pack`), or one document per row, cut at a maximum length (:func:`truncate`).

Sources: local text / json / jsonl / parquet files (a text column, or an already tokenized
``input_ids`` column), or by default text files already on this machine: the Python sources of the
installed ``transformers`` package (nothing is downloaded, nothing third-party is committed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets

_BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def default_text_files(max_chars: int = 600_000) -> list[Path]:
    """Source files of the installed ``transformers`` package, in a fixed order, up to ``max_chars``."""
    root = Path(importlib.util.find_spec("transformers").submodule_search_locations[0])
    files, total = [], 0
    for path in sorted((root / "models").glob("*/modeling_*.py")):
        files.append(path)
        total += path.stat().st_size
        if total >= max_chars:
            break
    return files


def load_rows(data_files: list[str] | None, text_column: str = "text") -> tuple[datasets.Dataset, str]:
    """The raw dataset and a short description of where it came from."""
    if not data_files:
        files = default_text_files()
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        desc = f"{len(files)} source files of the installed transformers package ({sum(map(len, texts))} characters)"
        return datasets.Dataset.from_dict({text_column: texts}), desc
    suffixes = {Path(f).suffix.lower() for f in data_files}
    builders = {_BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"--data files must all be one kind of {sorted(_BUILDERS)}; got suffixes {sorted(suffixes)}"
        )
    missing = [f for f in data_files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"--data file(s) not found: {missing}")
    ds = datasets.load_dataset(builders.pop(), data_files=list(data_files), split="train")
    return ds, ", ".join(Path(f).name for f in data_files)


def _packed_rows(ds: datasets.Dataset, seq_len: int, eos_id: int | None, separate: bool = False):
    """Rows of exactly ``seq_len`` tokens from the documents joined with EOS, carrying what is
    left of each batch of documents into the next, so only the stream's final remainder is lost.
    With ``separate`` every row also lists the lengths of its documents (``seq_lengths``; a
    document cut at a row's end continues as a new one in the next row)."""
    buf: list[int] = []
    docs: list[int] = []  # lengths of the documents (or their remainders) in buf, in order
    for batch in ds.iter(batch_size=1000):
        for ids in batch["input_ids"]:
            buf.extend(ids)
            if eos_id is not None:
                buf.append(eos_id)
            docs.append(len(ids) + (eos_id is not None))
        while len(buf) >= seq_len:
            row, take = {"input_ids": buf[:seq_len]}, _take(docs, seq_len)
            if separate:
                row["seq_lengths"] = take
            yield row
            del buf[:seq_len]


def _take(docs: list[int], n: int) -> list[int]:
    """Remove the first ``n`` tokens' worth of document lengths from ``docs``; return them."""
    out = []
    while n:
        k = min(n, docs[0])
        out.append(k)
        n -= k
        docs[0] -= k
        if not docs[0]:
            docs.pop(0)
    return out


def _tokenized(ds: datasets.Dataset, tokenizer, text_column: str) -> datasets.Dataset:
    """``ds`` with only an ``input_ids`` column, tokenizing ``text_column`` unless it has one."""
    if "input_ids" not in ds.column_names:
        if tokenizer is None:
            raise ValueError("the dataset has no input_ids column and the model folder has no tokenizer")
        if text_column not in ds.column_names:
            raise ValueError(f"no column {text_column!r} in the dataset (columns: {ds.column_names}); pass --text-column")
        ds = ds.map(
            lambda b: {"input_ids": tokenizer(b[text_column], add_special_tokens=False)["input_ids"]},
            batched=True,
            remove_columns=ds.column_names,
            desc="tokenizing",
        )
        return ds
    return ds.select_columns(["input_ids"])


def truncate(ds: datasets.Dataset, tokenizer, seq_len: int, text_column: str = "text") -> datasets.Dataset:
    """One row per document, cut to at most ``seq_len`` tokens; documents of fewer than 2 tokens
    (nothing to predict) are dropped. Rows keep their own lengths: the collator pads each batch."""
    ds = _tokenized(ds, tokenizer, text_column)
    ds = ds.map(lambda b: {"input_ids": [ids[:seq_len] for ids in b["input_ids"]]}, batched=True, desc="truncating")
    ds = ds.filter(lambda b: [len(ids) > 1 for ids in b["input_ids"]], batched=True, desc="dropping empty rows")
    if len(ds) == 0:
        raise ValueError("no document has 2 or more tokens: nothing to train on")
    return ds


def pack(ds: datasets.Dataset, tokenizer, seq_len: int, text_column: str = "text", eos_id: int | None = None,
         separate: bool = False) -> datasets.Dataset:
    """Tokenize (unless ``input_ids`` is already there), join documents with EOS and cut the
    stream into rows of exactly ``seq_len`` tokens (only the stream's final remainder, fewer than
    ``seq_len`` tokens, is dropped). ``separate``: rows carry their documents' lengths
    (``seq_lengths``), so attention and labels stay inside each document (the collator reads them)."""
    ds = _tokenized(ds, tokenizer, text_column)
    total = sum(len(ids) + (eos_id is not None) for b in ds.iter(batch_size=1000) for ids in b["input_ids"])
    if total < seq_len:
        raise ValueError(f"the data holds {total} tokens, fewer than {seq_len}: use more text or a shorter --seq-len")
    row = getattr(datasets, "List", None) or datasets.Sequence  # datasets >= 4 names it List
    columns = {"input_ids": row(datasets.Value("int64"))}
    if separate:
        columns["seq_lengths"] = row(datasets.Value("int64"))
    return datasets.Dataset.from_generator(
        _packed_rows, gen_kwargs=dict(ds=ds, seq_len=seq_len, eos_id=eos_id, separate=separate),
        features=datasets.Features(columns),
    )
