"""Training text as a ``datasets.Dataset`` of token rows: packed into fixed-length rows (with their
documents' boundaries, or plainly concatenated)
(:func:`pack`), or one document per row, cut at a maximum length (:func:`truncate`).

Sources: local text / json / jsonl / parquet files (a text column, or an already tokenized
``input_ids`` column), or by default text files already on this machine: the Python sources of the
installed ``transformers`` package (nothing is downloaded, nothing third-party is committed).

**Chat data**: rows with a ``messages`` column (a list of ``{"role", "content"}``) are rendered with
the tokenizer's chat template and trained on the assistant turns only (:func:`chat_tokens`,
:func:`pack_chat`, :func:`truncate_chat`); :func:`demo_conversations` makes up a small chat data
set on the spot for demos and tests.
"""

from __future__ import annotations

import bisect
import importlib.util
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from ..training.data import IGNORE_INDEX

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


# -- chat data ------------------------------------------------------------------------------------

CHAT_COLUMN = "messages"


class ChatFormatError(ValueError):
    """A conversation that cannot be turned into training tokens; the message names the row (0-based,
    in the order of the --data files) and says what to fix."""


def is_chat(ds: datasets.Dataset) -> bool:
    """Whether ``ds`` holds conversations (a ``messages`` column and no ready ``input_ids``)."""
    return CHAT_COLUMN in ds.column_names and "input_ids" not in ds.column_names


def check_chat_tokenizer(tokenizer) -> None:
    """Raise a ``ChatFormatError`` unless ``tokenizer`` can format and mask conversations: it needs a
    chat template and character offsets (a fast tokenizer, from ``tokenizer.json``)."""
    if tokenizer is None:
        raise ChatFormatError(
            "the data holds conversations (a 'messages' column) but the model folder has no tokenizer: "
            "add the tokenizer files (tokenizer.json, tokenizer_config.json) to the --model folder"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError(
            "the data holds conversations (a 'messages' column) but the tokenizer has no chat template to "
            "format them with: put the model's template in the --model folder (chat_template.jinja, or "
            "\"chat_template\" in tokenizer_config.json), or format the conversations into a text column"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ChatFormatError(
            "masking assistant turns needs a fast tokenizer (character offsets); the --model folder's "
            "tokenizer is a slow one: add its tokenizer.json"
        )


def check_messages(messages: Any, row: int, special: frozenset[str] = frozenset()) -> list[dict]:
    """The conversation of row ``row`` as a list of message dicts, or a ``ChatFormatError`` that
    says which message is wrong and how: each message needs a string ``role`` and string ``content``
    (keys set to None, as datasets fills them for missing ones, are dropped), the conversation at
    least one ``assistant`` message with a message before the first, and no content may contain one
    of the tokenizer's ``special`` tokens (it would end or open a turn in the middle of a message)."""
    where = f"chat row {row}"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError(f"{where}: 'messages' must be a non-empty list of {{role, content}} messages, "
                              f"got {type(messages).__name__} {str(messages)[:80]!r}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"{where}, message {i}: must be a {{role, content}} mapping, "
                                  f"got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "nothing" if key not in m else f"{type(m[key]).__name__} {repr(m[key])[:60]}"
                raise ChatFormatError(f"{where}, message {i}: {key!r} must be a string, got {got}")
        if not m["role"]:
            raise ChatFormatError(f"{where}, message {i}: empty role")
        for token in special:
            if token in m["content"]:
                raise ChatFormatError(
                    f"{where}, message {i} ({m['role']}): its content contains the special token {token!r}, "
                    "which would end or start a turn inside the message; remove it from the data"
                )
        out.append(m)
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        raise ChatFormatError(f"{where}: no 'assistant' message, so nothing to train on (roles: {roles}); "
                              "drop the row")
    if roles[0] == "assistant":
        raise ChatFormatError(f"{where}: the conversation starts with an assistant message; give it the user "
                              "(or system) message it answers, or drop the row")
    return out


def _render(tokenizer, messages: list[dict], generation_prompt: bool, row: int) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raises many kinds (TemplateError, TypeError, ...)
        raise ChatFormatError(f"chat row {row}: the chat template refused the conversation "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from None


def assistant_spans(tokenizer, messages: list[dict], row: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the chat template, and the character spans of its assistant turns.

    A turn's span starts where the template's rendering of the messages before it, with the
    generation prompt (``<|im_start|>assistant\\n`` for ChatML), ends, and stops at the end of the
    rendering through the turn, trailing whitespace removed: the assistant's content and the
    template's end-of-turn token (``<|im_end|>``), not the newline after it. Each of those prefix
    renderings is checked to be a prefix of the whole rendering (a template that rewrites earlier
    turns, e.g. dropping past reasoning, fails with a ``ChatFormatError``), and the generation prompt
    must add something (else the turn's start is unknown). Templates need no ``{% generation %}``
    markers."""
    full = _render(tokenizer, messages, False, row)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, row)
        plain = _render(tokenizer, messages[:i], False, row)
        through = _render(tokenizer, messages[: i + 1], False, row)
        if not (full.startswith(through) and through.startswith(before)):
            raise ChatFormatError(
                f"chat row {row}: the chat template renders the conversation up to message {i} differently "
                "from the start of the whole conversation (it rewrites earlier turns), so the assistant "
                "tokens cannot be located; use a template that renders every prefix of a conversation as a "
                "prefix"
            )
        if len(before) <= len(plain):
            raise ChatFormatError(
                "the chat template ignores add_generation_prompt, so where an assistant turn starts is "
                "unknown; use a template that writes the assistant header when add_generation_prompt is true"
            )
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return full, spans


def chat_tokens(tokenizer, messages: Any, row: int = 0,
                special: frozenset[str] | None = None) -> dict[str, list[int]]:
    """``input_ids`` of a conversation (the chat template's own tokens: the rendering tokenized
    without added special tokens) and ``labels``: the ids on the assistant turns' tokens (every
    token overlapping an :func:`assistant_spans` span), -100 everywhere else."""
    if special is None:
        special = frozenset(getattr(tokenizer, "all_special_tokens", ()))
    messages = check_messages(messages, row, special)
    full, spans = assistant_spans(tokenizer, messages, row)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels, k = [], 0
    for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        inside = k < len(spans) and a < spans[k][1] and max(b, a + 1) > spans[k][0]
        labels.append(token if inside else IGNORE_INDEX)
    return {"input_ids": list(enc["input_ids"]), "labels": labels}


def _tokenized_chats(ds: datasets.Dataset, tokenizer, seq_len: int) -> tuple[datasets.Dataset, str]:
    """Every conversation tokenized and masked, cut to ``seq_len`` tokens (keeping its start); those
    left with no assistant target dropped. Returns them and a description of what was cut."""
    check_chat_tokenizer(tokenizer)
    special = frozenset(getattr(tokenizer, "all_special_tokens", ()))

    def one(example, idx):
        out = chat_tokens(tokenizer, example[CHAT_COLUMN], idx, special)
        return {"input_ids": out["input_ids"][:seq_len], "labels": out["labels"][:seq_len],
                "cut": len(out["input_ids"]) > seq_len}

    ds = ds.map(one, with_indices=True, remove_columns=ds.column_names, desc="formatting conversations")
    cut = sum(ds["cut"])
    # the first token is never a target (nothing precedes it); a row needs a label after it
    kept = ds.filter(lambda b: [any(x != IGNORE_INDEX for x in lab[1:]) for lab in b["labels"]], batched=True,
                     desc="dropping conversations without targets")
    if len(kept) == 0:
        raise ChatFormatError(f"no conversation keeps an assistant token within --seq-len {seq_len}: "
                              "raise --seq-len")
    note = f"{len(ds)} conversations, loss on assistant turns only"
    if cut:
        note += f"; {cut} cut at {seq_len} tokens"
    if len(kept) < len(ds):
        note += f", {len(ds) - len(kept)} of them left with no assistant token and dropped"
    return kept.remove_columns("cut"), note


def truncate_chat(ds: datasets.Dataset, tokenizer, seq_len: int) -> tuple[datasets.Dataset, str]:
    """One conversation per row (``input_ids``, ``labels``), cut at ``seq_len`` tokens; and a
    description (see :func:`_tokenized_chats`)."""
    return _tokenized_chats(ds, tokenizer, seq_len)


def _bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity`` in total: best fit, longest
    first (deterministic; ties keep the input order)."""
    room: list[tuple[int, int]] = []  # (room left, bin index), sorted
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k == len(room):
            bins.append([i])
            bisect.insort(room, (capacity - lengths[i], len(bins) - 1))
            continue
        left, b = room.pop(k)
        bins[b].append(i)
        bisect.insort(room, (left - lengths[i], b))
    return bins


def pack_chat(ds: datasets.Dataset, tokenizer, seq_len: int) -> tuple[datasets.Dataset, str]:
    """Conversations packed whole into rows of at most ``seq_len`` tokens, each row listing its
    conversations' lengths (``seq_lengths``), so attention and labels stay inside each conversation
    (the collator reads them; a conversation is never split over rows, one longer than ``seq_len`` is
    cut). Columns ``input_ids``, ``labels`` (-100 off the assistant turns), ``seq_lengths``; and a
    description of the data."""
    chats, note = _tokenized_chats(ds, tokenizer, seq_len)
    ids, labels = chats["input_ids"], chats["labels"]
    bins = _bins([len(x) for x in ids], seq_len)

    def rows():
        for b in bins:
            yield {"input_ids": [t for i in b for t in ids[i]], "labels": [t for i in b for t in labels[i]],
                   "seq_lengths": [len(ids[i]) for i in b]}

    row = getattr(datasets, "List", None) or datasets.Sequence
    columns = ("input_ids", "labels", "seq_lengths")
    features = datasets.Features({key: row(datasets.Value("int64")) for key in columns})
    return datasets.Dataset.from_list(list(rows()), features=features), note


_WORDS = ("lantern", "river", "pepper", "garden", "marble", "copper", "window", "harbor", "violet",
          "timber", "candle", "meadow", "pocket", "silver", "thunder", "orchard", "pebble", "saddle")
_SYSTEM = ("You are a concise assistant.", "Answer in one short sentence.", "You are a patient maths tutor.")


def _exchange(rng: random.Random) -> tuple[str, str, int | None]:
    """One made-up question, its answer, and the number it ends on (for a follow-up), if any."""
    kind = rng.randrange(5)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    word = rng.choice(_WORDS)
    if kind == 0:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", a + b
    if kind == 1:
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", a * b
    if kind == 2:
        return f"Spell the word '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'.", None
    if kind == 3:
        return (f"How many letters are in the word '{word}'?", f"The word '{word}' has {len(word)} letters.",
                len(word))
    nums = [rng.randint(1, 50) for _ in range(rng.randint(3, 6))]
    return (f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}.",
            f"From smallest to largest: {', '.join(map(str, sorted(nums)))}.", None)


def demo_conversations(n: int = 512, seed: int = 0) -> datasets.Dataset:
    """``n`` made-up conversations (a ``messages`` column): arithmetic, spelling, counting and
    sorting questions with their correct answers, some with a system message, some with a follow-up
    turn. Generated on the spot from a seed, so no third-party text is needed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(_SYSTEM)}] if rng.random() < 0.3 else []
        question, answer, number = _exchange(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if number is not None and rng.random() < 0.4:
            k = rng.randint(2, 9)
            messages += [{"role": "user", "content": f"And what is that times {k}?"},
                         {"role": "assistant", "content": f"{number} times {k} is {number * k}."}]
        rows.append({CHAT_COLUMN: messages})
    return datasets.Dataset.from_list(rows)
