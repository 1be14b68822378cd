"""The architecture's shared pieces: the options object, the agreement primitive, kernel
capabilities and their fallback chain, the one-time warning helper."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import dist_workers
import hf_striped
from hf_striped import RingOptions
from hf_striped.core.options import build_options
from hf_striped.kernels import KERNELS, KernelChain, select_kernel
from hf_striped.log import reset_warnings, warn_once


def test_options_are_validated_once_and_frozen(monkeypatch):
    monkeypatch.setenv("HF_STRIPED_TIMEOUT", "42")
    monkeypatch.setenv("HF_STRIPED_CHECK_FINITE", "1")
    opts = RingOptions(layout="zigzag")
    assert (opts.layout, opts.backend, opts.timeout, opts.check_finite) == ("zigzag", "auto", 42.0, True)
    monkeypatch.setenv("HF_STRIPED_TIMEOUT", "7")  # read when built, never again
    assert opts.timeout == 42.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.layout = "striped"
    assert opts.replace(timeout=3).timeout == 3.0 and opts.replace(timeout=3).layout == "zigzag"
    with pytest.raises(ValueError, match="unknown layout 'diagonal'; choose one of striped, contiguous, zigzag"):
        RingOptions(layout="diagonal")
    with pytest.raises(ValueError, match="unknown backend 'triton'; choose one of auto"):
        opts.replace(backend="triton")
    with pytest.raises(ValueError, match="positive, finite number of seconds"):
        RingOptions(timeout=-1)
    with pytest.raises(TypeError, match="number of seconds"):
        RingOptions(timeout="10")
    with pytest.raises(TypeError, match="RingHooks"):
        RingOptions(hooks=print)


def test_options_or_settings_not_both():
    opts = RingOptions(layout="contiguous")
    assert build_options(opts) is opts
    assert build_options(None, layout="zigzag", backend=None).layout == "zigzag"
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match=r"either options= or the separate settings \(layout\).*options.replace"):
        hf_striped.ring_attention(q, q, q, options=opts, layout="striped")
    with pytest.raises(ValueError, match="either options="):
        with hf_striped.context_parallel(None, options=opts, timeout=3):
            pass
    with hf_striped.context_parallel(None, options=opts) as state:
        assert state.options is opts and state.layout == "contiguous"
    cp = hf_striped.ContextParallel(1, options=opts)
    assert cp.options is opts and cp.layout == "contiguous"


def test_trainer_arguments_build_the_options_when_created(tmp_path):
    from hf_striped.training.trainer import StripedTrainingArguments

    args = StripedTrainingArguments(output_dir=str(tmp_path), cp_layout="zigzag", cp_timeout=12, report_to=[])
    assert args.cp_options == RingOptions(layout="zigzag", timeout=12)
    with pytest.raises(ValueError, match="unknown layout 'diag'"):
        StripedTrainingArguments(output_dir=str(tmp_path), cp_layout="diag", report_to=[])


def test_ring_hooks_see_every_step_and_block():
    """In-process P = 3: on_step sees each ring step of each rank, forward and backward;
    on_block sees every block's results (what the finite guard would check)."""
    steps, blocks = [], []
    hooks = hf_striped.RingHooks(on_step=lambda phase, step, name: steps.append((phase, step)),
                                 on_block=lambda phase, step, name, results: blocks.append((phase, tuple(results))))
    from hf_striped.core.layout import shard_local
    from hf_striped.core.ring import ring_attention_inprocess

    q = torch.randn(1, 12, 2, 8, requires_grad=True)
    parts = [shard_local(q, 1, "striped", r, 3) for r in range(3)]
    outs, _ = ring_attention_inprocess(parts, parts, parts, options=RingOptions(hooks=hooks))
    sum(o.sum() for o in outs).backward()
    assert sorted(steps) == sorted([(p, s) for p in ("forward", "backward") for s in range(3) for _ in range(3)])
    assert {b for b in blocks} == {("forward", ("the block output",)), ("backward", ("the block's dq", "dk", "dv"))}


@pytest.mark.parametrize("case", ["same", "differ", "refuse"])
def test_agree_gives_every_rank_the_same_verdict_in_one_collective(dist_pool, case):
    res = dist_pool(3).run(dist_workers.agreement, case)
    for rank, (got, collectives) in enumerate(res):
        print(rank, got, collectives)
        # fields a, b plus the primitive's own failure flag and failing rank, as max of x and -x
        assert collectives == [("all_reduce", 8)], collectives
        if case == "same":
            assert got == ("verdict", {"a": 7, "b": 100}, {"a": 7, "b": 100}, [])
        elif case == "differ":
            assert got == ("verdict", {"a": 7, "b": 100}, {"a": 7, "b": 101}, ["b"])
        elif rank == 1:
            assert got == ("ValueError", "rank 1 refuses its inputs")
        else:
            assert got == ("RuntimeError", "peer 1 refused")


def test_select_kernel_returns_the_fallback_chain():
    q = torch.randn(1, 8, 2, 16)
    chain = select_kernel("auto", q, q, q)
    assert isinstance(chain, KernelChain) and [k.name for k in chain.kernels] == ["torch_cpu", "reference"]
    assert chain.name == "torch_cpu" and chain.capabilities.float32_backward and not chain.capabilities.band
    assert chain.for_block(None).name == "torch_cpu" and chain.for_block((0, 3)).name == "reference"
    assert chain.starting_with("softcap").name == "reference"
    assert [k.name for k in select_kernel("reference", q, q, q).kernels] == ["reference"]
    with pytest.raises(ValueError, match="no kernel of .* can compute document_mask"):
        chain.starting_with("document_mask")


def test_kernels_declare_capabilities_and_keep_no_call_state_on_the_shared_instances():
    for name, kern in KERNELS.items():
        caps = kern.capabilities
        assert all(isinstance(getattr(caps, f.name), (bool, int)) for f in dataclasses.fields(caps)), name
        mine = kern.for_call()
        assert type(mine) is type(kern)
        if name.startswith("torch_") and name != "torch_cpu":  # per-call bookkeeping: a fresh object per call
            assert mine is not kern and mine._extras is not kern._extras and not kern._extras
    assert KERNELS["reference"].capabilities.band and KERNELS["reference"].capabilities.softcap
    assert not any(k.capabilities.document_mask for k in KERNELS.values())


def test_warn_once():
    reset_warnings()
    with pytest.warns(RuntimeWarning, match="^first$"):
        assert warn_once("first")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_once("first")
        assert not warn_once("other text", key="first")
    reset_warnings()
    with pytest.warns(UserWarning, match="again"):
        warn_once("again", category=UserWarning)
