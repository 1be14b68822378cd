"""Packed-documents benchmark: how balanced and fast each layout's ring is on rows of packed
documents (padding-free rows, causal attention within each document only).

A row of N = P * c tokens is filled with documents drawn from a mixture (seeded; the last
document is cut so the row holds exactly N tokens):

* ``chat``: long-tailed SFT mix, lognormal lengths of mean about 600, clipped to [16, 8192];
* ``code``: files of 200-3000 tokens (log-uniform), 5% of them 16k-24k tokens;
* ``one_long``: one document of half the row among many short ones of 50-800 tokens.

Layouts (variants), each a :class:`hf_striped.core.documents.Placement`:

* ``striped``: hf-striped's default, ``placement("striped", P, N, bounds)`` (the document
  placement: long documents striped, short ones whole on one rank, the rest contiguous);
* ``striped_plain``: every document striped (``plain_placement("striped", ...)``);
* ``contiguous``: llama3-style, ``plain_placement("contiguous", ...)``;
* ``zigzag_padded``: as ring-flash-attention's zigzag varlen / TransformerEngine THD do it: every
  document padded to a multiple of 2P and cut into 2P chunks, rank r holding chunks r and
  2P-1-r of every document; padding tokens attend like real ones and count as waste (the row has
  N' >= N tokens, c' = N'/P per rank).

Every (rank, source) block is timed alone with the ring's exact per-step compute
(``hf_striped.core.schedule.forward_step`` / ``backward_step`` on the calls
``placement_blocks(pl, rank, source, True)``; a block with no calls costs zero). At ring step k
rank r computes source (r - k) mod P, a step lasts as long as its slowest rank, so

    critical path = sum over steps of max over ranks of the block time  (fwd; fwdbwd = fwd + bwd)
    ideal         = sum over documents of its causal attention alone on one process / P
    efficiency    = ideal / critical path

The ideal is one forward_step (+ backward_step) call per document on its ``[1, L]`` block with
one causal call, timed in the same run, so padding and per-call overhead are waste. Communication
is not timed (compute only, as ``bench_schedule.py``): ``ring_bytes_per_step`` is what one K/V
message carries (travel * kv_heads * head_dim * 2 * itemsize; 0 and ``ring_steps`` = 1 when no
rank attends to another's tokens). ``score_efficiency`` is the same ratio if time were
proportional to visible scores (no per-call cost, no kernel tile waste): it separates imbalance
from kernel effects.

Variants and the documents' ideal alternate inside every (step, rank) cell of every repeat; each
figure is a median over repeats. On the CPU blocks are timed by the process's CPU time (one torch
thread by default). Before timing, every variant's whole ring forward is checked against the
documents' own attention (``max_abs_diff_vs_documents``) and its outputs feed the backward.

    python scripts/bench_packed.py                     # CPU defaults: P 2 4 8, c 4096 8192
    python scripts/bench_packed.py --P 8 --tokens 16384 --mixes one_long --repeats 1
    python scripts/bench_packed.py --quick --out /tmp/packed.csv   # smoke test, seconds

Any tokens per rank work (4k-64k is the range that matters for long-context training); larger c
than the default works with ``--tokens`` but is slow on a 2-core CPU (a 32k-token causal document
is ~25 s fwd+bwd on one core, and every variant and the ideal compute every document once per
repeat).

Rows go to ``benchmarks/results/packed.csv`` (``scripts/plot_benchmarks.py`` draws them).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from bench_common import RESULTS, Recorder, add_block_args, finish_block_args, median, shape_str, timed
from hf_striped.core.documents import Placement, Run, deferred_blocks, placement, placement_blocks, plain_placement
from hf_striped.core.layout import Block
from hf_striped.core.schedule import _acc_dtype, backward_step, forward_step
from hf_striped.kernels import select_kernel

MIXES = ("chat", "code", "one_long")
DEFAULT_VARIANTS = ("striped", "striped_plain", "zigzag_padded", "contiguous")
IDEAL = "ideal"


# ---------------------------------------------------------------------------------------------
# Mixtures


def mixture(name: str, n: int, rng: np.random.Generator, scale: float = 1.0) -> list[int]:
    """Document lengths filling a row of exactly ``n`` tokens (the last one cut to fit).
    ``scale`` shrinks every length parameter (``--quick``)."""

    def sc(x):
        return max(1, int(round(x * scale)))

    def draw():
        if name == "chat":
            return int(np.clip(rng.lognormal(math.log(600) - 0.5, 1.0) * scale, sc(16), sc(8192)))
        if name == "code":
            if rng.random() < 0.05:
                return int(rng.integers(sc(16384), sc(24576) + 1))
            return int(round(math.exp(rng.uniform(math.log(sc(200)), math.log(sc(3000))))))
        if name == "one_long":
            return int(rng.integers(sc(50), sc(800) + 1))
        raise SystemExit(f"unknown mixture {name!r}; mixtures are {', '.join(MIXES)}")

    lengths, total = [], 0
    if name == "one_long":
        total = n // 2  # the long document, inserted at a random place below
    while total < n:
        L = max(1, draw())
        lengths.append(min(L, n - total))
        total += lengths[-1]
    if name == "one_long":
        lengths.insert(int(rng.integers(0, len(lengths) + 1)), n // 2)
    assert sum(lengths) == n and min(lengths) >= 1
    return lengths


def bounds_of(lengths) -> tuple[int, ...]:
    return (0, *itertools.accumulate(lengths))


# ---------------------------------------------------------------------------------------------
# Placements


def zigzag_padded_placement(P: int, bounds: tuple[int, ...]) -> tuple[Placement, tuple[int, ...]]:
    """Peers' zigzag for packed rows: every document padded to a multiple of 2P (the padding is
    the document's last tokens), cut into 2P chunks, rank r holding chunks r and 2P-1-r of every
    document, document after document. Returns the placement over the padded row and the
    padded row's document bounds."""
    m = 2 * P
    padded = [-(-(b - a) // m) * m for a, b in zip(bounds, bounds[1:])]
    pb = bounds_of(padded)
    runs: list[list[Run]] = [[] for _ in range(P)]
    used = [0] * P
    for d, Lp in enumerate(padded):
        h = Lp // m
        for r in range(P):
            for chunk in (r, m - 1 - r):
                runs[r].append(Run(used[r], h, pb[d] + chunk * h, 1, d))
                used[r] += h
    c2 = pb[-1] // P
    assert all(u == c2 for u in used)
    return Placement(P, c2, tuple(tuple(x) for x in runs), c2), pb


def _work(L: int) -> int:
    return L * (L + 1) // 2


def build(variant: str, P: int, n: int, bounds: tuple[int, ...]) -> tuple[Placement, tuple[int, ...]]:
    """The variant's placement of the row and the (padded) row's document bounds."""
    if variant == "striped":
        return placement("striped", P, n, bounds), bounds
    if variant == "striped_plain":
        return plain_placement("striped", P, n, bounds), bounds
    if variant == "contiguous":
        return plain_placement("contiguous", P, n, bounds), bounds
    if variant == "zigzag_padded":
        return zigzag_padded_placement(P, bounds)
    raise SystemExit(f"unknown variant {variant!r}; variants are {', '.join(DEFAULT_VARIANTS)}")


def visible_scores(blks: list[Block]) -> int:
    """Query-key pairs the calls compute (causal calls are squares, see ``lower_calls``)."""
    total = 0
    for b in blks:
        m = b.q.stop - b.q.start
        n = b.k.stop - b.k.start
        total += _work(m) if b.causal else m * n
    return total


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Variant:
    name: str
    pl: Placement
    pbounds: tuple[int, ...]  # document bounds of the variant's (padded) row
    qs: list[torch.Tensor]
    ks: list[torch.Tensor]
    vs: list[torch.Tensor]
    douts: list[torch.Tensor]
    sent: list[tuple[torch.Tensor, torch.Tensor]]  # per rank the K/V message: the first `travel` tokens
    blks: dict  # (rank, source) -> calls on the source's K/V, at step (rank - source) mod P
    local: dict  # (rank, step) -> calls on the rank's own K/V at that step (deferred whole documents)
    final: list  # per rank (out, lse [b, h, c]) for backward
    buffers: tuple  # (out, lse_t, dq, (dk, dv) of c' tokens, (dk, dv) received: `travel` tokens)


@dataclass
class Case:
    P: int
    c: int
    mix: str
    lengths: list[int]
    bounds: tuple[int, ...]
    row: tuple[torch.Tensor, ...]  # q, k, v, dout of the whole row [b, N, h, d]
    kernel: Any
    acc: torch.dtype
    base: dict
    clock: Callable[[], float]
    sync: Callable[[], None] | None

    @property
    def scale(self) -> float:
        return self.row[0].shape[-1] ** -0.5

    def timed(self, fn) -> float:
        return timed(fn, self.sync, self.clock)

    def accumulators(self, n: int):
        b, _, h, d = self.row[0].shape
        dev = self.row[0].device
        return (torch.zeros(b, n, h, d, dtype=self.acc, device=dev),
                torch.full((b, n, h), float("-inf"), dtype=self.acc, device=dev))


def _case(P, c, mix, args, sync) -> Case:
    dtype = getattr(torch, args.dtype)
    n = P * c
    rng = np.random.default_rng([args.seed, MIXES.index(mix), n])
    lengths = mixture(mix, n, rng, args.mix_scale)
    g = torch.Generator().manual_seed(args.seed)
    b, hq, hk, d = args.batch, args.heads, args.kv_heads, args.head_dim
    row = tuple(torch.randn(b, n, heads, d, generator=g).to(dtype=dtype, device=args.device)
                for heads in (hq, hk, hk, hq))
    kernel = select_kernel(args.backend, row[0][:, :1], row[1][:, :1], row[2][:, :1])
    base = dict(P=P, c=c, mix=mix, seed=args.seed, b=b, h=hq, hk=hk, d=d, dtype=args.dtype, kernel=kernel.name,
                clock=args.clock)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    return Case(P, c, mix, lengths, bounds_of(lengths), row, kernel, _acc_dtype(dtype), base, clock, sync)


def _real_positions(bounds, pbounds, device=None) -> torch.Tensor:
    """Where each real token of the row lies in the (padded) row."""
    return torch.cat([torch.arange(b - a, device=device) + pa for a, b, pa in zip(bounds, bounds[1:], pbounds)])


def _variant_row(case: Case, pbounds) -> tuple[torch.Tensor, ...]:
    """The row's tensors laid out on the variant's (padded) row: padding tokens get fresh values."""
    n2 = pbounds[-1]
    if n2 == case.bounds[-1]:
        return case.row
    pos = _real_positions(case.bounds, pbounds, case.row[0].device)
    g = torch.Generator().manual_seed(1)
    out = []
    for x in case.row:
        y = torch.randn(x.shape[0], n2, *x.shape[2:], generator=g).to(dtype=x.dtype, device=x.device)
        y[:, pos] = x
        out.append(y)
    return tuple(out)


def _reference(case: Case):
    """Every document's causal attention alone: per document (out, lse [b, h, L]), and the row's
    output in natural order."""
    q, k, v, _ = case.row
    full = [Block(slice(None), slice(None), True)]
    docs, outs = [], []
    for a, b in zip(case.bounds, case.bounds[1:]):
        o, lt = case.accumulators(b - a)
        forward_step(q[:, a:b], k[:, a:b], v[:, a:b], o, lt, full, case.kernel, case.scale)
        docs.append((o, lt.transpose(1, 2).contiguous()))
        outs.append(o)
    return docs, torch.cat(outs, dim=1)


def _prepare(case: Case, name: str, ref_out, check: bool, rec) -> Variant:
    P = case.P
    pl, pbounds = build(name, P, P * case.c, case.bounds)
    rows = _variant_row(case, pbounds)
    idx = [pl.indices(r, rows[0].device) for r in range(P)]
    qs, ks, vs, douts = ([x.index_select(1, idx[r]) for r in range(P)] for x in rows)
    sent = [(ks[r][:, :pl.travel].contiguous(), vs[r][:, :pl.travel].contiguous()) for r in range(P)]
    blks = {(r, s): placement_blocks(pl, r, s, True) for r in range(P) for s in range(P)}
    local = {(r, s): deferred_blocks(pl, r, s, True) for r in range(P) for s in range(P)}
    final = []
    for r in range(P):
        o, lt = case.accumulators(pl.c)
        for s in range(P) if check else [r]:  # the whole ring, or the diagonal block as a stand-in
            k, v = (ks[r], vs[r]) if s == r else sent[s]
            forward_step(qs[r], k, v, o, lt, blks[(r, s)], case.kernel, case.scale)
        for step in range(P):
            forward_step(qs[r], ks[r], vs[r], o, lt, local[(r, step)], case.kernel, case.scale)
        final.append((o if case.kernel.capabilities.float32_backward else o.to(qs[r].dtype),
                      lt.transpose(1, 2).contiguous()))
    if check:
        got = torch.empty(ref_out.shape[0], pbounds[-1], *ref_out.shape[2:], dtype=ref_out.dtype, device=ref_out.device)
        for r in range(P):
            got[:, idx[r]] = final[r][0].to(got.dtype)
        got = got[:, _real_positions(case.bounds, pbounds, got.device)]
        err = float((got.double() - ref_out.double()).abs().max())
        rec.add(name, shape_str(**case.base), "max_abs_diff_vs_documents", err)
    o, lt = case.accumulators(pl.c)
    home = (torch.zeros(ks[0].shape, dtype=case.acc), torch.zeros(vs[0].shape, dtype=case.acc))
    recv = tuple(x.to(case.acc) for x in sent[0])  # stands in for the dK/dV partial sums a step receives
    return Variant(name, pl, pbounds, qs, ks, vs, douts, sent, blks, local, final,
                   (o, lt, torch.zeros_like(o), home, recv))


def _time_cell(case: Case, var: Variant, r: int, s: int, cells: dict) -> None:
    src = (r - s) % case.P
    blks, local = var.blks[(r, src)], var.local[(r, s)]
    if not blks and not local:  # nothing to compute at this step: no compute at all
        cells[(var.name, "fwd", r, s)].append(0.0)
        cells[(var.name, "bwd", r, s)].append(0.0)
        return
    acc_out, acc_lse, dq, home, recv = var.buffers
    acc_out.zero_()
    acc_lse.fill_(float("-inf"))
    # as the ring: step 0 on the local K/V, later steps on the message (its first `travel` tokens),
    # and the whole documents scheduled at this step on the local K/V
    q, dout, k0, v0 = var.qs[r], var.douts[r], var.ks[r], var.vs[r]
    k, v = (k0, v0) if s == 0 else var.sent[src]
    kernel, scale, acc = case.kernel, case.scale, case.acc

    def fwd():
        forward_step(q, k, v, acc_out, acc_lse, blks, kernel, scale)
        forward_step(q, k0, v0, acc_out, acc_lse, local, kernel, scale)

    out, lse = var.final[r]

    def bwd():  # as the ring: step 0 starts the partial sums, later steps add into those received
        backward_step(dout, q, k, v, out, lse, dq, blks, kernel, scale, acc, into=recv if s else None)
        if local:
            backward_step(dout, q, k0, v0, out, lse, dq, local, kernel, scale, acc, into=home)

    cells[(var.name, "fwd", r, s)].append(case.timed(fwd))
    cells[(var.name, "bwd", r, s)].append(case.timed(bwd))


def _time_docs(case: Case, docs_ref, which, ideal: dict) -> None:
    """Time documents ``which`` alone (one causal call each), forward and backward."""
    q, k, v, dout = case.row
    full = [Block(slice(None), slice(None), True)]
    kernel, scale, acc = case.kernel, case.scale, case.acc
    for d in which:
        a, b = case.bounds[d], case.bounds[d + 1]
        qd, kd, vd, dod = q[:, a:b], k[:, a:b], v[:, a:b], dout[:, a:b]
        o, lt = case.accumulators(b - a)
        ideal[("fwd", d)].append(case.timed(lambda: forward_step(qd, kd, vd, o, lt, full, kernel, scale)))
        out, lse = docs_ref[d]
        dq = torch.zeros_like(o)
        ideal[("bwd", d)].append(case.timed(
            lambda: backward_step(dod, qd, kd, vd, out, lse, dq, full, kernel, scale, acc)))


def _time_all(case: Case, variants: list[Variant], docs_ref, repeats: int):
    """Every (variant, pass, rank, step) block and every document alone, ``repeats`` times. The
    documents are spread over the (step, rank) cells, and the order of variants and documents
    rotates from cell to cell so that none always runs first."""
    P, D = case.P, len(case.lengths)
    cells = {(v.name, p, r, s): [] for v in variants for p in ("fwd", "bwd") for r in range(P) for s in range(P)}
    ideal = {(p, d): [] for p in ("fwd", "bwd") for d in range(D)}
    order = [*variants, IDEAL]
    for _ in range(repeats):
        for s, r in itertools.product(range(P), range(P)):
            j = s * P + r
            order = order[1:] + order[:1]
            for v in order:
                if v is IDEAL:
                    _time_docs(case, docs_ref, range(j, D, P * P), ideal)
                else:
                    _time_cell(case, v, r, s, cells)
    return cells, ideal


def _summarize(rec, case: Case, variants: list[Variant], cells, ideal, repeats: int) -> dict:
    """Record every figure; returns {(variant, pass): {figure: value}} for the table."""
    P, base = case.P, case.base
    med = {key: median(ts) for key, ts in cells.items()}
    ideal_s = {p: sum(median(ideal[(p, d)]) for d in range(len(case.lengths))) / P for p in ("fwd", "bwd")}
    ideal_s["fwdbwd"] = ideal_s["fwd"] + ideal_s["bwd"]
    real_scores = sum(_work(L) for L in case.lengths)
    item = case.row[1].element_size()
    hk, d = case.row[1].shape[2], case.row[1].shape[3]
    out = {}
    for v in variants:
        name, pl = v.name, v.pl
        step_calls = {(r, s): v.blks[(r, (r - s) % P)] + v.local[(r, s)] for r in range(P) for s in range(P)}
        ncalls = {key: len(x) for key, x in step_calls.items()}
        scores = {key: visible_scores(x) for key, x in step_calls.items()}
        tokens = [sum(run.length for run in pl.runs[r]) for r in range(P)]
        crit, calls = {}, {}
        for p in ("fwd", "bwd"):
            worst = [max(range(P), key=lambda r: med[(name, p, r, s)]) for s in range(P)]
            crit[p] = sum(med[(name, p, worst[s], s)] for s in range(P))
            calls[p] = sum(ncalls[(worst[s], s)] for s in range(P))
            for r, s in itertools.product(range(P), range(P)):
                rec.add(name, shape_str(**base, pass_=p, rank=r, step=s), "block_s", med[(name, p, r, s)])
        crit["fwdbwd"], calls["fwdbwd"] = crit["fwd"] + crit["bwd"], calls["fwd"] + calls["bwd"]
        score_path = sum(max(scores[(r, s)] for r in range(P)) for s in range(P))
        fixed = dict(
            ring_bytes_per_step=pl.travel * hk * d * 2 * item,
            ring_steps=P if pl.travel else 1,
            travel_tokens=pl.travel,
            padding_tokens=v.pbounds[-1] - case.bounds[-1],
            token_imbalance=max(tokens) - min(tokens),
            documents=len(case.lengths),
            longest_document=max(case.lengths),
            kernel_calls_total=sum(ncalls.values()),
            empty_blocks=sum(1 for x in ncalls.values() if x == 0),
            score_efficiency=real_scores / P / score_path,
            repeats=repeats,
        )
        for f, val in fixed.items():
            rec.add(name, shape_str(**base), f, val)
        for p in ("fwd", "fwdbwd"):
            sh = shape_str(**base, pass_=p)
            eff = ideal_s[p] / crit[p]
            rec.add(name, sh, "efficiency", eff)
            rec.add(name, sh, "critical_path_s", crit[p])
            rec.add(name, sh, "ideal_s", ideal_s[p])
            rec.add(name, sh, "kernel_calls", calls[p])
            out[(name, p)] = dict(fixed, efficiency=eff, critical_path_s=crit[p], ideal_s=ideal_s[p],
                                  kernel_calls=calls[p])
    return out


def bench_case(rec, P, c, mix, args, sync) -> dict:
    case = _case(P, c, mix, args, sync)
    docs_ref, ref_out = _reference(case)
    variants = [_prepare(case, name, ref_out, args.check, rec) for name in args.variants]
    cells, ideal = _time_all(case, variants, docs_ref, args.repeats)
    return _summarize(rec, case, variants, cells, ideal, args.repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--P", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192],
                    help="tokens per rank c (4k-64k is the range that matters; more than 8192 works but is slow on a 2-core CPU)")
    ap.add_argument("--mixes", nargs="+", default=list(MIXES), choices=MIXES)
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    help=f"layouts: {', '.join(DEFAULT_VARIANTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix-scale", type=float, default=1.0, help="scale every document length parameter")
    add_block_args(ap)
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the whole-ring forward check against the documents' own attention (backward "
                         "then takes each rank's diagonal block as a stand-in output)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: P=2, c=128, one repeat, mixtures scaled down 32x")
    ap.add_argument("--out", default=str(RESULTS / "packed.csv"))
    args = ap.parse_args(argv)
    if args.quick:
        args.P, args.tokens, args.repeats, args.mix_scale = [2], [128], 1, 1 / 32
    for v in args.variants:
        if v not in DEFAULT_VARIANTS:
            ap.error(f"unknown variant {v!r}; variants are {', '.join(DEFAULT_VARIANTS)}")
    finish_block_args(args)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    rec = Recorder("packed", args.out, args.device)
    print(f"# {rec.hardware} | {rec.versions}")
    print(f"{'mix':<9} {'P':>2} {'c':>6} {'variant':<22} {'eff fwd':>7} {'eff f+b':>7} {'score eff':>9} "
          f"{'calls f+b':>9} {'docs':>4} {'pad':>5} {'ring KiB/step':>13} {'imbal':>5} {'s':>6}")
    t_start = time.perf_counter()
    try:
        for c, P, mix in itertools.product(args.tokens, args.P, args.mixes):
            t0 = time.perf_counter()
            res = bench_case(rec, P, c, mix, args, sync)
            wall = time.perf_counter() - t0
            for v in args.variants:
                f, fb = res[(v, "fwd")], res[(v, "fwdbwd")]
                ring = f"{f['ring_bytes_per_step'] / 1024:.0f}" if f["ring_steps"] > 1 else "none"
                print(f"{mix:<9} {P:>2} {c:>6} {v:<22} {f['efficiency']:>7.3f} {fb['efficiency']:>7.3f} "
                      f"{f['score_efficiency']:>9.3f} {fb['kernel_calls']:>9} {f['documents']:>4} "
                      f"{f['padding_tokens']:>5} {ring:>13} {f['token_imbalance']:>5} {wall:>6.0f}", flush=True)
    finally:
        if rec.rows:
            print(f"# {len(rec.rows)} rows appended to {rec.write()} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
