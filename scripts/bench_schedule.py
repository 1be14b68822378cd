"""Ring-schedule benchmark: how balanced each layout's ring is on this machine's real kernels.

For P virtual ranks holding c tokens each, every (rank, step) block of the ring is timed alone
(the exact per-step code of the schedule, ``hf_striped.core.schedule.forward_step`` /
``backward_step``: kernel calls plus the fp32 merge), forward and backward. A ring step lasts as
long as its slowest rank, so

    critical path = sum over steps of max over ranks of the block time
    efficiency    = ideal / critical path,  ideal = P/2 full (non-causal c x c) blocks
    ratio         = critical path of the contiguous ring / critical path of the layout

(the ideal ratio is 2 - 1/P). Layouts and variants alternate inside every
cell of every repeat, and each figure is a median over repeats. On the CPU blocks are timed by
the process's CPU time (one thread by default), so other work on a shared machine does not
inflate them; ``--clock wall`` times elapsed seconds instead. ``layout@split`` pins the causal
split (``striped@256``: causal blocks split down to 256-token diagonal pieces, see
``hf_striped.core.layout.blocks``); a bare layout uses the kernel's ``causal_split``.

The full ring is also run once per variant through the in-process transport (real schedule
generators): its output must match the same layout unsplit, and its wall time is recorded.

    python scripts/bench_schedule.py                       # CPU defaults, a few minutes
    python scripts/bench_schedule.py --P 8 --tokens 4096 8192 --distinct --repeats 2
    python scripts/bench_schedule.py --device cuda --dtype bfloat16 --heads 32 --kv-heads 8 \\
        --head-dim 128 --P 8 --tokens 4096 16384 65536

Rows go to ``benchmarks/results/schedule.csv`` (``scripts/plot_benchmarks.py`` draws them).
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from bench_common import RESULTS, Recorder, add_block_args, finish_block_args, median, shape_str, timed
from hf_striped.kernels import select_kernel
from hf_striped.core.layout import LAYOUTS, blocks
from hf_striped.core.schedule import (RingPlan, _acc_dtype, backward_schedule, backward_step, forward_schedule, forward_step,
                                      kernel_split)
from hf_striped.core.transport import run_inprocess

DEFAULT_VARIANTS = ("striped", "striped@256", "zigzag", "contiguous")


def parse_variant(v: str) -> tuple[str, int | None]:
    layout, _, split = v.partition("@")
    if layout not in LAYOUTS:
        raise SystemExit(f"unknown layout in variant {v!r}; layouts are {', '.join(LAYOUTS)}")
    return layout, (int(split) if split else None)


def _inputs(P, b, c, h, hk, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda heads: [torch.randn(b, c, heads, d, generator=g).to(dtype=dtype, device=device) for _ in range(P)]  # noqa: E731
    return mk(h), mk(hk), mk(hk), mk(h)


def _ring(P, layout, split, qs, ks, vs, douts, kernel, scale):
    """The full ring through the in-process transport: per-rank (out, lse, dq, dk, dv)."""
    plans = [RingPlan(rank=r, world_size=P, layout=layout, causal=True, scale=scale, kernels=kernel, split=split)
             for r in range(P)]
    fwd = run_inprocess([forward_schedule(qs[r], ks[r], vs[r], plans[r]) for r in range(P)])
    outs = [o if kernel.capabilities.float32_backward else o.to(qs[0].dtype) for o, _ in fwd]
    bwd = run_inprocess([backward_schedule(douts[r], qs[r], ks[r], vs[r], outs[r], fwd[r][1], plans[r])
                         for r in range(P)])
    return [(fwd[r][0], fwd[r][1], *bwd[r]) for r in range(P)], outs


@dataclass(frozen=True)
class Case:
    """One benchmark shape: ``P`` virtual ranks of ``c`` tokens, every rank's inputs (each a list
    of P tensors ``(b, c, heads, d)``), the kernel, and how a block is timed."""

    P: int
    c: int
    qs: list[torch.Tensor]
    ks: list[torch.Tensor]
    vs: list[torch.Tensor]
    douts: list[torch.Tensor]
    kernel: Any
    acc: torch.dtype  # the accumulation dtype of out, lse and dq
    base: dict  # the CSV shape fields
    clock: Callable[[], float]
    sync: Callable[[], None] | None

    @property
    def scale(self) -> float:
        return self.qs[0].shape[-1] ** -0.5

    def out_lse(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh forward accumulators: out ``(b, c, h, d)`` zeros and lse ``(b, c, h)`` -inf."""
        b, c, h, d = self.qs[0].shape
        return (torch.zeros(b, c, h, d, dtype=self.acc, device=self.qs[0].device),
                torch.full((b, c, h), float("-inf"), dtype=self.acc, device=self.qs[0].device))

    def timed(self, fn) -> float:
        return timed(fn, self.sync, self.clock)


def _case(P, c, args, sync) -> Case:
    dtype = getattr(torch, args.dtype)
    qs, ks, vs, douts = _inputs(P, args.batch, c, args.heads, args.kv_heads, args.head_dim, dtype, args.device)
    kernel = select_kernel(args.backend, qs[0], ks[0], vs[0])
    base = dict(P=P, c=c, b=args.batch, h=args.heads, hk=args.kv_heads, d=args.head_dim, dtype=args.dtype,
                kernel=kernel.name, clock=args.clock)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    return Case(P, c, qs, ks, vs, douts, kernel, _acc_dtype(dtype), base, clock, sync)


def _stand_in(case: Case, layout: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``r``'s final (out, lse) as backward blocks take them, from its diagonal block only:
    timing does not depend on their values."""
    o, lt = case.out_lse()
    forward_step(case.qs[r], case.ks[r], case.vs[r], o, lt, blocks(layout, r, r, case.P, case.c, True), case.kernel, case.scale)
    return (o if case.kernel.capabilities.float32_backward else o.to(case.qs[0].dtype),
            lt.transpose(1, 2).contiguous())


def _check_ring(rec, case: Case, v, reference: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run variant ``v``'s whole ring through the in-process transport; record its wall time and its
    largest difference from the same layout unsplit (kept in ``reference`` per layout). Returns
    every rank's final (out, lse)."""
    layout, split = v
    P, qs, ks, vs, douts, kernel, scale = case.P, case.qs, case.ks, case.vs, case.douts, case.kernel, case.scale
    t0 = time.perf_counter()
    res, outs = _ring(P, layout, split, qs, ks, vs, douts, kernel, scale)
    if case.sync:
        case.sync()
    wall = time.perf_counter() - t0
    if layout not in reference:
        reference[layout] = res if kernel_split(kernel, split) == 0 else _ring(P, layout, 0, qs, ks, vs, douts, kernel, scale)[0]
    err = max(
        float((a.double() - r.double()).abs().max())
        for got, ref in zip(res, reference[layout]) for a, r in zip(got, ref)
    )
    rec.add(_name(v), shape_str(**case.base), "max_abs_diff_vs_unsplit", err)
    rec.add(_name(v), shape_str(**case.base), "inprocess_ring_fwdbwd_s", wall)
    return [(outs[r], res[r][1]) for r in range(P)]


def _final_outputs(rec, case: Case, variants, check: bool) -> dict:
    """Per variant, every rank's final (out, lse) that its backward blocks need: from the whole
    ring, checked (``check``), or stand-ins."""
    outs_lses, reference = {}, {}
    for v in variants:
        if check:
            outs_lses[v] = _check_ring(rec, case, v, reference)
        else:
            outs_lses[v] = [_stand_in(case, v[0], r) for r in range(case.P)]
    return outs_lses


def _time_cell(case: Case, v, r: int, s: int, out_lse, buffers, cells: dict, seen: dict | None) -> None:
    """Time the forward and backward block of rank ``r`` at ring step ``s`` of variant ``v`` into
    ``cells``. ``seen``: block lists already timed at this step (``--distinct``), whose times are
    reused for the same work; None times every cell."""
    layout, split = v
    src = (r - s) % case.P
    blks = blocks(layout, r, src, case.P, case.c, True, split=kernel_split(case.kernel, split))
    key = (v, s, repr(blks))
    if seen is not None and key in seen:  # same work as a cell timed above
        for p in ("fwd", "bwd"):
            cells[(v, p, r, s)].append(cells[(v, p, seen[key], s)][-1])
        return
    if seen is not None:
        seen[key] = r
    acc_out, acc_lse, dq = buffers
    acc_out.zero_()
    acc_lse.fill_(float("-inf"))
    qs, ks, vs, douts, kernel, scale, acc = case.qs, case.ks, case.vs, case.douts, case.kernel, case.scale, case.acc
    cells[(v, "fwd", r, s)].append(case.timed(
        lambda: forward_step(qs[r], ks[src], vs[src], acc_out, acc_lse, blks, kernel, scale)))
    out, lse = out_lse
    cells[(v, "bwd", r, s)].append(case.timed(
        lambda: backward_step(douts[r], qs[r], ks[src], vs[src], out, lse, dq, blks, kernel, scale, acc)))


def _time_full(case: Case, out_lse, buffers, full: dict) -> None:
    """Time one full (non-causal c x c) block, forward and backward, into ``full``: the unit of the
    ideal critical path."""
    acc_out, acc_lse, dq = buffers
    out0, lse0 = out_lse
    P, qs, ks, vs, douts, kernel, scale, acc = case.P, case.qs, case.ks, case.vs, case.douts, case.kernel, case.scale, case.acc
    full_blk = blocks("striped", 0, 0, P, case.c, False)
    full["fwd"].append(case.timed(lambda: forward_step(qs[0], ks[1 % P], vs[1 % P], acc_out, acc_lse, full_blk, kernel, scale)))
    full["bwd"].append(case.timed(lambda: backward_step(douts[0], qs[0], ks[1 % P], vs[1 % P], out0, lse0, dq, full_blk,
                                                        kernel, scale, acc)))


def _time_blocks(case: Case, variants, outs_lses: dict, repeats: int, distinct: bool) -> tuple[dict, dict]:
    """Every (variant, pass, rank, step) block timed ``repeats`` times, variants rotating so none
    always runs first, and a full block per step; returns (cells, full) lists of seconds."""
    P = case.P
    cells = {(v, p, r, s): [] for v in variants for p in ("fwd", "bwd") for r in range(P) for s in range(P)}
    full = {"fwd": [], "bwd": []}
    order = list(variants)
    for _ in range(repeats):
        seen = {} if distinct else None
        for s in range(P):
            acc_out, acc_lse = case.out_lse()
            buffers = (acc_out, acc_lse, torch.zeros_like(acc_out))
            _time_full(case, outs_lses[variants[0]][0], buffers, full)
            for r in range(P):
                order = order[1:] + order[:1]  # rotate: no variant always runs first
                for v in order:
                    _time_cell(case, v, r, s, outs_lses[v][r], buffers, cells, seen)
    return cells, full


def _summarize(rec, case: Case, variants, cells: dict, full: dict) -> tuple[dict, dict]:
    """Record the median block times, each variant's critical path and efficiency, and its ratio
    to the contiguous ring; returns (unit: full-block seconds per pass, summary: critical path
    per (variant, pass))."""
    P, base = case.P, case.base
    unit = {p: median(full[p]) for p in full}
    rec.add("full_block", shape_str(**base, pass_="fwd"), "block_s", unit["fwd"])
    rec.add("full_block", shape_str(**base, pass_="bwd"), "block_s", unit["bwd"])
    unit["fwdbwd"] = unit["fwd"] + unit["bwd"]
    med = {key: median(ts) for key, ts in cells.items()}
    summary = {}
    for v in variants:
        crit = {}
        for p in ("fwd", "bwd"):
            crit[p] = sum(max(med[(v, p, r, s)] for r in range(P)) for s in range(P))
            for r, s in itertools.product(range(P), range(P)):
                rec.add(_name(v), shape_str(**base, pass_=p, rank=r, step=s), "block_s", med[(v, p, r, s)])
        crit["fwdbwd"] = crit["fwd"] + crit["bwd"]
        for p in ("fwd", "fwdbwd"):
            summary[(v, p)] = crit[p]
            rec.add(_name(v), shape_str(**base, pass_=p), "critical_path_s", crit[p])
            rec.add(_name(v), shape_str(**base, pass_=p), "efficiency", P / 2 * unit[p] / crit[p])
    contiguous = [k for k in variants if k[0] == "contiguous"]
    for v in variants:
        for p in ("fwd", "fwdbwd"):
            if contiguous:
                rec.add(_name(v), shape_str(**base, pass_=p), "ratio_to_contiguous",
                        summary[(contiguous[0], p)] / summary[(v, p)])
    return unit, summary


def bench_shape(rec, P, c, args, variants, sync):
    """Benchmark every variant at ``P`` ranks of ``c`` tokens into ``rec``; returns (unit,
    summary) as ``_summarize``."""
    case = _case(P, c, args, sync)
    outs_lses = _final_outputs(rec, case, variants, args.check)  # (and the whole-ring check)
    cells, full = _time_blocks(case, variants, outs_lses, args.repeats, args.distinct)
    return _summarize(rec, case, variants, cells, full)


def _name(v) -> str:
    layout, split = v
    return layout if split is None else f"{layout}@{split}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--P", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048], help="tokens per rank (c)")
    add_block_args(ap)
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    help="layout or layout@split (split 0 = one causal call per block)")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the whole-ring run through the in-process transport (slow at large shapes)")
    ap.add_argument("--distinct", action="store_true",
                    help="time only one cell per distinct block list in each step (identical work) and "
                         "reuse it for the others: for large shapes; the heatmap then repeats values")
    ap.add_argument("--out", default=str(RESULTS / "schedule.csv"))
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]
    finish_block_args(args)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    rec = Recorder("schedule", args.out, args.device)
    print(f"# {rec.hardware} | {rec.versions}")
    print(f"{'P':>3} {'c':>6} {'variant':<14} {'eff fwd':>8} {'eff f+b':>8} {'x contig fwd':>13} {'x contig f+b':>13} (ideal {'':>0})")
    try:
        for P, c in itertools.product(args.P, args.tokens):
            unit, summary = bench_shape(rec, P, c, args, variants, sync)
            for v in variants:
                cont = [k for k in variants if k[0] == "contiguous"]
                rf = summary[(cont[0], "fwd")] / summary[(v, "fwd")] if cont else float("nan")
                rb = summary[(cont[0], "fwdbwd")] / summary[(v, "fwdbwd")] if cont else float("nan")
                ef = P / 2 * unit["fwd"] / summary[(v, "fwd")]
                eb = P / 2 * unit["fwdbwd"] / summary[(v, "fwdbwd")]
                print(f"{P:>3} {c:>6} {_name(v):<14} {ef:>8.3f} {eb:>8.3f} {rf:>13.3f} {rb:>13.3f} ({2 - 1 / P:.3f})", flush=True)
    finally:
        if rec.rows:
            print(f"# {len(rec.rows)} rows appended to {rec.write()}")


if __name__ == "__main__":
    main()
