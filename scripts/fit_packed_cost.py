"""Fit the packed-documents placement's cost model (``hf_striped.core.documents``: CALL_SCORES,
ROW_SCORES, KEY_SCORES) to this machine's block kernel.

It times every (rank, ring step) cell of ``scripts/bench_packed.py`` (the ring's exact per-step
compute: ``forward_step`` + ``backward_step`` into received partial sums, cold as in the ring) for
the striped placement and padded zigzag, plus every document alone, and fits by least squares on
relative error

    time = per_score * (scores + CALL * calls + ROW * query rows + KEY * keys)

with a causal call of L tokens counted as ``L * (L + min(L, CAUSAL_TILE)) / 2`` scores. Prints
the constants in scores and the fit's rms relative error; paste them into documents.py.

    python scripts/fit_packed_cost.py                       # P 8 and 4, chat/code/one_long, c 4096
    python scripts/fit_packed_cost.py --P 8 --tokens 8192 --repeats 1
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import bench_packed as B
from hf_striped.core.documents import CAUSAL_TILE


class _Quiet:
    def add(self, *args):
        pass


def _features(blks) -> list[float]:
    scores = 0.0
    for b in blks:
        m, n = b.q.stop - b.q.start, b.k.stop - b.k.start
        scores += m * (m + min(m, CAUSAL_TILE)) / 2 if b.causal else m * n
    return [len(blks), sum(b.q.stop - b.q.start for b in blks), sum(b.k.stop - b.k.start for b in blks), scores]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--P", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--mixes", nargs="+", default=list(B.MIXES), choices=B.MIXES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    opts = argparse.Namespace(dtype="float32", seed=0, mix_scale=1.0, batch=1, heads=4, kv_heads=4, head_dim=64,
                              device="cpu", backend="auto", clock="cpu", check=False)
    X, y = [], []
    for P in args.P:
        for mix in args.mixes:
            case = B._case(P, args.tokens, mix, opts, None)
            docs_ref, ref_out = B._reference(case)
            variants = [B._prepare(case, name, ref_out, False, _Quiet()) for name in ("striped", "zigzag_padded")]
            cells, ideal = B._time_all(case, variants, docs_ref, args.repeats)
            for v in variants:
                for r in range(P):
                    for s in range(P):
                        blks = v.blks[(r, (r - s) % P)] + v.local[(r, s)]
                        if blks:
                            X.append(_features(blks))
                            y.append(sum(B.median(cells[(v.name, p, r, s)]) for p in ("fwd", "bwd")))
            for d, length in enumerate(case.lengths):
                X.append([1, length, length, length * (length + min(length, CAUSAL_TILE)) / 2])
                y.append(sum(B.median(ideal[(p, d)]) for p in ("fwd", "bwd")))
            print(f"P={P} {mix}: {len(y)} cells so far", flush=True)
    X, y = np.asarray(X, dtype=float), np.asarray(y)
    w = 1 / y
    coef, *_ = np.linalg.lstsq(X * w[:, None], y * w, rcond=None)
    call, row, key, per_score = coef
    rms = float(np.sqrt(np.mean(((X @ coef - y) / y) ** 2)))
    print(f"per score {per_score * 1e9:.2f} ns; CALL_SCORES {call / per_score:.0f}, ROW_SCORES {row / per_score:.1f}, "
          f"KEY_SCORES {key / per_score:.1f}; rms relative error {rms:.3f} over {len(y)} cells")


if __name__ == "__main__":
    main()
