"""Training text as a ``datasets.Dataset`` of fixed-length token rows.

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


def pack(ds: datasets.Dataset, tokenizer, seq_len: int, text_column: str = "text", eos_id: int | None = None) -> datasets.Dataset:
    """Tokenize (unless ``input_ids`` is already there), join documents with EOS and cut the
    stream into rows of exactly ``seq_len`` tokens (the remainder is dropped)."""
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
    else:
        ds = ds.select_columns(["input_ids"])

    def chunk(batch):
        stream = []
        for ids in batch["input_ids"]:
            stream.extend(ids)
            if eos_id is not None:
                stream.append(eos_id)
        n = len(stream) // seq_len * seq_len
        return {"input_ids": [stream[i : i + seq_len] for i in range(0, n, seq_len)]}

    packed = ds.map(chunk, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="packing")
    if len(packed) == 0:
        raise ValueError(f"the data holds fewer than {seq_len} tokens: use more text or a shorter --seq-len")
    return packed
