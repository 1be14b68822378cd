"""Bad input: one test per kind of bad input listed below, each checking the exception type and that the
message says how to fix the input (``match=`` on the fix, not only on the problem).

Bad input -> test:

* CP size that does not divide the world size -> ``test_cp_size_that_does_not_divide_the_world``,
  ``test_cp_size_without_a_process_group``
* sequence length not splittable by the layout (raw API) -> ``test_length_the_layout_cannot_split``
* lengths the collator must pad -> ``test_collator_pads_to_what_the_layout_needs``
* batches that differ between the ranks of one CP group -> ``test_different_batches_in_one_cp_group``
* missing position_ids inside a CP context -> ``test_missing_position_ids_raise_on_every_rank``
* q/k/v mismatched across ranks -> tests/test_guards.py (every rank raises)
* dropout during training -> ``test_attention_dropout_in_training``
* unsupported dtype for the chosen backend -> ``test_dtype_the_named_backend_cannot_run``,
  ``test_dtype_no_kernel_can_run``
* a non-causal model asked to use striped_ring -> ``test_non_causal_model``
* a CP context entered without an initialised process group -> ``test_context_without_a_process_group``
* empty batches -> ``test_empty_batches``, ``test_step_without_target_tokens``
* sequences shorter than P -> ``test_sequence_shorter_than_p_raw_api``,
  ``test_collator_pads_rows_shorter_than_p``, ``test_step_without_target_tokens``
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import hf_striped
import bad_input_workers
from bad_input_workers import cp_size_case, different_batches_case, missing_position_ids_case
from hf_striped.training.data import IGNORE_INDEX, StripingCollator
from hf_striped.kernels import select_kernel
from hf_striped.core.layout import LAYOUTS, shard_local, unshard_local
from hf_striped.training.parallel import ContextParallel
from models import tiny_llama_config


def _all_raised(results, exc_type: str, fix: str) -> None:
    """Every rank raised ``exc_type`` and its message contains ``fix`` (no rank left waiting)."""
    assert all(r is not None and r[0] == exc_type and fix in r[1] for r in results), results


# -- CP size ------------------------------------------------------------------------------------

def test_cp_size_that_does_not_divide_the_world(dist_pool):
    _all_raised(dist_pool(2).run(cp_size_case, 3), "ValueError", "or choose cp_size from [1, 2]")


def test_cp_size_without_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="launch with `accelerate launch` or `torchrun`"):
        ContextParallel(cp_size=2)


# -- lengths ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, P, n, padded", [("striped", 4, 10, 12), ("contiguous", 3, 7, 9), ("zigzag", 2, 6, 8)])
def test_length_the_layout_cannot_split(layout, P, n, padded):
    with pytest.raises(ValueError, match=rf"Pad the sequence to {padded} tokens"):
        shard_local(torch.zeros(1, n), 1, layout, 0, P)
    if layout == "zigzag":  # the raw ring call with an odd per-rank length
        q = torch.randn(1, 3, 2, 8)
        with pytest.raises(ValueError, match=r"Shard with hf_striped.shard\(\.\.\., layout='zigzag'\)"):
            hf_striped.ring_attention(q, q, q, layout="zigzag")


@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_collator_pads_to_what_the_layout_needs(layout, P):
    rows = [list(range(3, 3 + 11)), list(range(50, 55))]
    parts = [StripingCollator(cp_rank=r, cp_size=P, layout=layout, pad_token_id=0)([{"input_ids": x} for x in rows])
             for r in range(P)]
    m = 2 * P if layout == "zigzag" else P
    n = -(-11 // m) * m
    ids = unshard_local([p["input_ids"] for p in parts], 1, layout)
    labels = unshard_local([p["shift_labels"] for p in parts], 1, layout)
    assert ids.shape == labels.shape == (2, n)
    for i, r in enumerate(rows):
        assert ids[i, : len(r)].tolist() == r and (ids[i, len(r):] == 0).all()
        assert labels[i, : len(r) - 1].tolist() == r[1:] and (labels[i, len(r) - 1:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("layout, P, n", [("striped", 4, 3), ("contiguous", 2, 0), ("zigzag", 2, 3)])
def test_sequence_shorter_than_p_raw_api(layout, P, n):
    with pytest.raises(ValueError, match=r"some rank would get no tokens: pad the sequence to \d+ tokens.*or build "
                                         r"batches with hf_striped.StripingCollator"):
        shard_local(torch.zeros(1, n), 1, layout, 0, P)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_collator_pads_rows_shorter_than_p(layout):
    P = 4
    parts = [StripingCollator(cp_rank=r, cp_size=P, layout=layout, pad_token_id=0)([{"input_ids": [7, 8]}])
             for r in range(P)]
    assert all(p["input_ids"].shape == (1, 2 if layout == "zigzag" else 1) for p in parts)
    ids = unshard_local([p["input_ids"] for p in parts], 1, layout)
    labels = unshard_local([p["shift_labels"] for p in parts], 1, layout)
    assert ids[0, :2].tolist() == [7, 8] and (ids[0, 2:] == 0).all()
    assert labels[0, 0] == 8 and (labels[0, 1:] == IGNORE_INDEX).all()


# -- empty batches and steps with nothing to learn ---------------------------------------------

@pytest.mark.parametrize("features, fix", [
    ([], r"Check that the dataset is not empty"),
    ([{"input_ids": []}, {"input_ids": []}], r"filter out empty rows before training"),
])
def test_empty_batches(features, fix):
    with pytest.raises(ValueError, match=fix):
        StripingCollator(cp_rank=0, cp_size=2)(features)


@pytest.mark.parametrize("features", [
    [{"input_ids": [5]}, {"input_ids": [9]}],  # single tokens: nothing left to predict after the shift
    [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}],  # every label masked
], ids=["single-token rows", "all labels -100"])
def test_step_without_target_tokens(features):
    cp = ContextParallel(1)
    batch = cp.collator(pad_token_id=0)(features)
    with pytest.raises(ValueError, match=r"drop such rows before collating"):
        cp.num_items([batch])


# -- batches and positions across the CP group ---------------------------------------------------

def test_different_batches_in_one_cp_group(dist_pool):
    _all_raised(dist_pool(2).run(different_batches_case), "ValueError",
                "shard the data loader over data-parallel replicas only (ContextParallel.prepare_dataloader) "
                "and seed any shuffling identically on every rank")


def test_missing_position_ids_raise_on_every_rank(dist_pool, tiny_llama_dir):
    """Llama numbers the local tokens 0..c-1 itself when position_ids are missing; the context's
    collective position check then refuses them on both ranks (the explicit ``None`` path, for
    models that pass it through, says ``position_ids=hf_striped.shard(...)``)."""
    results = dist_pool(2).run(missing_position_ids_case, tiny_llama_dir)
    assert len(results) == 2
    _all_raised(results, "ValueError", "Build them with hf_striped.shard(torch.arange(N).expand(batch, -1), dim=1, "
                "group=group, layout=layout)")
    with hf_striped.context_parallel(None) as state:
        with pytest.raises(ValueError, match=r"position_ids=hf_striped.shard\(torch.arange\(seq_len\)"):
            state.check_positions(None, 1, 8)


# -- model features -------------------------------------------------------------------------------

def _forward_in_context(model, n=8):
    ids = torch.randint(3, 100, (1, n))
    with hf_striped.context_parallel(None):
        return model(input_ids=ids, position_ids=torch.arange(n)[None])


def test_attention_dropout_in_training():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(attention_dropout=0.1))
    model.set_attn_implementation("striped_ring")
    model.train()
    with pytest.raises(NotImplementedError, match=r"Set model.config.attention_dropout = 0.0"):
        _forward_in_context(model)


def test_non_causal_model():
    """BERT (an encoder, bidirectional attention) is in the registry's UNTESTED list, so it passes
    the family check with a warning; the attention call then refuses non-causal attention."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    model = BertModel(cfg, add_pooling_layer=False)
    model.set_attn_implementation("striped_ring")
    model.eval()  # its attention dropout would be refused first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the untested-family warning
        with pytest.raises(NotImplementedError, match=r"non-causal .*striped_ring is for causal language models"):
            _forward_in_context(model)


# -- dtypes ---------------------------------------------------------------------------------------

def test_dtype_the_named_backend_cannot_run(monkeypatch):
    """A backend named explicitly never silently becomes another kernel. On this CPU every kernel
    takes bf16/fp16/fp32/fp64, so the refusal is simulated with the torch_cpu kernel's dtype list
    narrowed to float32; a CUDA kernel given float64 takes the same path."""
    from hf_striped.kernels import KERNELS

    kernel = KERNELS["torch_cpu"]
    real = kernel.unsupported_reason
    monkeypatch.setattr(kernel, "unsupported_reason",
                        lambda q, k, v: None if q.dtype == torch.float32 and real(q, k, v) is None
                        else f"dtype {q.dtype} is not one of (torch.float32,)")
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"cast q/k/v to one of torch.float32 or use backend='auto', which would "
                                        r"pick 'reference' here"):
        select_kernel("torch_cpu", q, q, q)
    with pytest.raises(TypeError, match=r"cast q/k/v to one of torch.float32"):
        hf_striped.ring_attention(q, q, q, backend="torch_cpu")


@pytest.mark.parametrize("backend", ["auto", "torch_cpu", "reference"])
def test_dtype_no_kernel_can_run(backend):
    q = torch.randn(1, 4, 2, 8).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"cast q/k/v to one of torch.bfloat16, torch.float16, torch.float32, "
                                        r"torch.float64"):
        hf_striped.ring_attention(q, q, q, backend=backend)


# -- process group ------------------------------------------------------------------------------

def test_context_without_a_process_group(monkeypatch):
    """Launched by torchrun/accelerate (WORLD_SIZE=2 in the environment) but without
    init_process_group: ``dist.group.WORLD`` is then ``None``, and the context must refuse
    instead of silently running as one process."""
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match=r"call torch.distributed.init_process_group"):
        with hf_striped.context_parallel(dist.group.WORLD):
            pass


@pytest.mark.parametrize("what, match", [
    ("positions", "neither"),
    ("too_long", "longer than the model's max_position_embeddings"),
    ("cu_order", "strictly increase"),
    ("cu_cover", "run from 0 to the packed row's length"),
    ("cu_differ", "different document boundaries"),
])
def test_bad_packed_rows_raise_on_every_rank(dist_pool, tiny_llama_dir, what, match):
    """Packed documents given wrongly: every rank raises the same kind of error at once (a rank
    whose own check refused its input tells its peers, who stop too), none waits."""
    res = dist_pool(2).run(bad_input_workers.packed_case, tiny_llama_dir, what)
    for rank, (got, seconds) in enumerate(res):
        print(rank, got, f"{seconds:.2f} s")
        assert got is not None and seconds < 10, (rank, got)
    assert any(match in msg for _, msg in (got for got, _ in res)), res
    for got, _ in res:
        assert got[0] == "ValueError", got
        assert match in got[1] or "rejected its inputs" in got[1], got


def test_padding_inside_a_packed_row_is_refused():
    from transformers import DataCollatorWithFlattening

    def flatten_with_padding(features):
        batch = DataCollatorWithFlattening(return_tensors="pt")(features)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["attention_mask"][0, 2] = 0
        return batch

    collate = StripingCollator(cp_rank=0, cp_size=2, base_collator=flatten_with_padding)
    with pytest.raises(ValueError, match="padding-free row has padding"):
        collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
