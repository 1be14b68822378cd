"""Properties of the striping collator (hypothesis), and its errors for inputs it cannot handle exactly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_striped.training.data import IGNORE_INDEX, StripingCollator, batch_fingerprint
from hf_striped.core.layout import LAYOUTS, unshard_local

rows_st = st.lists(st.lists(st.integers(3, 999), min_size=1, max_size=40), min_size=1, max_size=4)


def stripes(rows, layout, p, **kw):
    feats = [{"input_ids": r} for r in rows]
    return [StripingCollator(cp_rank=r, cp_size=p, layout=layout, pad_token_id=0, **kw)(feats) for r in range(p)]


@settings(max_examples=60, deadline=None)
@given(rows=rows_st, layout=st.sampled_from(LAYOUTS), p=st.integers(1, 5), multiple=st.sampled_from([1, 4]))
def test_stripes_round_trip_align_labels_and_count_tokens(rows, layout, p, multiple):
    parts = stripes(rows, layout, p, pad_to_multiple_of=multiple)
    ids = unshard_local([x["input_ids"] for x in parts], 1, layout)
    labels = unshard_local([x["shift_labels"] for x in parts], 1, layout)
    pos = unshard_local([x["position_ids"] for x in parts], 1, layout)
    n = ids.shape[1]
    m = math.lcm(2 * p if layout == "zigzag" else p, multiple)
    assert n == -(-max(map(len, rows)) // m) * m  # the least length the layout (and alignment) can split
    assert torch.equal(pos, torch.arange(n).expand(len(rows), -1))
    for i, r in enumerate(rows):
        assert ids[i, : len(r)].tolist() == r
        assert (ids[i, len(r):] == 0).all()
        # the target of position t is token t + 1 of the same row, wherever t and t + 1 live
        assert labels[i, : len(r) - 1].tolist() == r[1:]
        assert (labels[i, len(r) - 1:] == IGNORE_INDEX).all()
    assert sum(int(x["shift_labels"].ne(IGNORE_INDEX).sum()) for x in parts) == sum(len(r) - 1 for r in rows)
    assert all(torch.equal(x["labels"], x["shift_labels"]) for x in parts)
    assert all(torch.equal(x["cp_fingerprint"], parts[0]["cp_fingerprint"]) for x in parts)


@settings(max_examples=40, deadline=None)
@given(rows=rows_st, p=st.integers(2, 4), data=st.data())
def test_given_labels_are_shifted_once_and_padding_ignored(rows, p, data):
    feats = []
    for r in rows:
        k = data.draw(st.integers(0, len(r)))
        feats.append({"input_ids": r, "labels": [IGNORE_INDEX] * k + r[k:]})
    parts = [StripingCollator(cp_rank=q, cp_size=p, pad_token_id=0)(feats) for q in range(p)]
    labels = unshard_local([x["shift_labels"] for x in parts], 1, "striped")
    for i, f in enumerate(feats):
        assert labels[i, : len(f["labels"]) - 1].tolist() == f["labels"][1:]
        assert (labels[i, len(f["labels"]) - 1:] == IGNORE_INDEX).all()


def test_works_on_top_of_a_transformers_collator():
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1, "b": 2, "<unk>": 3}, unk_token="<unk>")))
    tok.pad_token = "<pad>"
    base = DataCollatorForLanguageModeling(tok, mlm=False)
    feats = [{"input_ids": [1, 2, 1, 2, 1]}, {"input_ids": [2, 2]}]
    parts = [StripingCollator(cp_rank=r, cp_size=2, base_collator=base, pad_token_id=0)(feats) for r in range(2)]
    labels = unshard_local([x["shift_labels"] for x in parts], 1, "striped")
    assert labels.tolist() == [[2, 1, 2, 1, -100, -100], [2, -100, -100, -100, -100, -100]]


def test_left_padding_is_refused_with_a_fix():
    feats = [{"input_ids": [0, 0, 5, 6], "attention_mask": [0, 0, 1, 1]}, {"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1]}]
    with pytest.raises(ValueError, match="padding_side = 'right'"):
        StripingCollator(cp_rank=0, cp_size=2)(feats)


def test_right_padding_mask_is_honoured():
    feats = [{"input_ids": [5, 6, 9, 9], "attention_mask": [1, 1, 0, 0]}, {"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1]}]
    batch = StripingCollator(cp_rank=0, cp_size=1, pad_token_id=0).global_batch(feats)
    assert batch["input_ids"][0].tolist() == [5, 6, 0, 0]
    assert batch["shift_labels"][0].tolist() == [6, -100, -100, -100]


def test_ragged_rows_refused_when_padding_is_off():
    with pytest.raises(ValueError, match="pack the dataset"):
        StripingCollator(cp_rank=0, cp_size=2, pad_ragged=False)([{"input_ids": [1, 2]}, {"input_ids": [1, 2, 3]}])


def test_sequence_longer_than_the_model_positions_is_refused():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        StripingCollator(cp_rank=0, cp_size=4, max_length=64)([{"input_ids": list(range(3, 70))}])


@pytest.mark.parametrize("feats, match", [([], "empty batch"), ([{"input_ids": []}], "every row of the batch is empty"),
                                          ([{"text": "x"}], "tokenize the dataset first")])
def test_empty_or_untokenized_batches_are_refused(feats, match):
    with pytest.raises(ValueError, match=match):
        StripingCollator(cp_rank=0, cp_size=2)(feats)


def test_bad_collator_arguments():
    with pytest.raises(ValueError, match="cp_rank"):
        StripingCollator(cp_rank=2, cp_size=2)
    with pytest.raises(ValueError, match="unknown layout"):
        StripingCollator(cp_rank=0, cp_size=2, layout="ring")


def test_fingerprint_sees_one_changed_token():
    ids = torch.randint(0, 1000, (2, 64))
    other = ids.clone()
    other[1, 37] += 1
    assert not torch.equal(batch_fingerprint(ids), batch_fingerprint(other))
    assert torch.equal(batch_fingerprint(ids), batch_fingerprint(ids.clone()))


def test_packing_carries_the_remainder_across_document_batches():
    import datasets

    from hf_striped.tools.textdata import pack

    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7]] * 2500})  # 10,000 tokens with EOS, short documents
    packed = pack(ds, None, 3000, eos_id=0)
    assert len(packed) == 3  # 9,000 of 10,000 tokens: only the final remainder is lost
    assert packed[0]["input_ids"][:8] == [5, 6, 7, 0, 5, 6, 7, 0]
    assert all(len(r) == 3000 for r in packed["input_ids"])
    with pytest.raises(ValueError, match="10000 tokens, fewer than 20000"):
        pack(ds, None, 20000, eos_id=0)


@pytest.mark.parametrize("layout", ["striped", "contiguous", "zigzag"])
@pytest.mark.parametrize("P", [1, 2, 3])
def test_packing_keeps_documents_apart(layout, P):
    """Rows packed into one padding-free row: positions restart per document, no label crosses
    a document, the padding is a document of its own, every rank's part follows the documents
    and carries the global boundaries."""
    from hf_striped.core.documents import places_documents, unshard_placed
    from hf_striped.core.layout import unshard_local

    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]},
            {"input_ids": [9, 10, 11, 12, 13], "labels": [-100, -100, 11, 12, 13]}]
    parts = [StripingCollator(cp_rank=r, cp_size=P, layout=layout, pad_token_id=0, packing=True)(rows) for r in range(P)]
    cu = parts[0]["cu_seq_lens_q"]
    n = int(cu[-1])
    assert cu.dtype == torch.int32 and cu[:4].tolist() == [0, 3, 4, 9] and n % (2 * P if layout == "zigzag" else P) == 0
    assert all(torch.equal(p["cu_seq_lens_q"], cu) and torch.equal(p["cu_seq_lens_k"], cu) for p in parts)
    bounds = tuple(cu.tolist())
    join = (lambda xs: unshard_placed(xs, 1, layout, bounds)) if places_documents(layout, P, bounds) else \
        (lambda xs: unshard_local(xs, 1, layout))
    ids, pos, labels = (join([p[k] for p in parts])[0].tolist() for k in ("input_ids", "position_ids", "shift_labels"))
    assert ids[:9] == [5, 6, 7, 8, 9, 10, 11, 12, 13] and set(ids[9:]) <= {0}
    assert pos == [0, 1, 2, 0, 0, 1, 2, 3, 4] + list(range(n - 9))
    assert labels[:9] == [6, 7, -100, -100, -100, 11, 12, 13, -100] and set(labels[9:]) <= {-100}
    assert all(torch.equal(p["labels"], p["shift_labels"]) for p in parts)


def test_pre_packed_rows_and_a_flattening_base_collator_give_the_same_row():
    from transformers import DataCollatorWithFlattening

    docs = [[5, 6, 7], [8], [9, 10, 11, 12]]
    flat = StripingCollator(cp_rank=1, cp_size=2, base_collator=DataCollatorWithFlattening())([{"input_ids": d} for d in docs])
    packed = StripingCollator(cp_rank=1, cp_size=2, packing=True)([{"input_ids": d} for d in docs])
    rows = StripingCollator(cp_rank=1, cp_size=2)([{"input_ids": [5, 6, 7, 8], "seq_lengths": [3, 1]},
                                                   {"input_ids": [9, 10, 11, 12], "seq_lengths": [4]}])
    for key in ("input_ids", "position_ids", "shift_labels", "cu_seq_lens_q", "cp_fingerprint"):
        assert torch.equal(flat[key], packed[key]) and torch.equal(packed[key], rows[key]), key
    with pytest.raises(ValueError, match="seq_lengths"):
        StripingCollator(cp_rank=0, cp_size=2)([{"input_ids": [5, 6, 7], "seq_lengths": [2]}])


def test_packed_documents_longer_than_the_model_are_refused():
    with pytest.raises(ValueError, match="a packed document has 5 tokens, more than the model's 4 positions"):
        StripingCollator(cp_rank=0, cp_size=2, packing=True, max_length=4)([{"input_ids": [1, 2, 3, 4, 5]}])
    # the row itself may be longer than the model's positions: they restart per document
    out = StripingCollator(cp_rank=0, cp_size=2, packing=True, max_length=4)([{"input_ids": [1, 2, 3]}] * 3)
    assert int(out["cu_seq_lens_q"][-1]) == 10


def test_pack_with_separate_documents_lists_their_lengths():
    import datasets

    from hf_striped.tools.textdata import pack

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14]]})
    rows = list(pack(ds, None, 4, eos_id=0, separate=True))
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 0, 6, 7], [0, 8, 9, 10], [11, 12, 13, 14]]
    assert [r["seq_lengths"] for r in rows] == [[4], [2, 2], [1, 3], [4]]
    assert "seq_lengths" not in pack(ds, None, 4, eos_id=0).column_names
