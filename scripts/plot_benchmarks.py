"""Draw the benchmark plots and the README summary table from the CSV rows in
``benchmarks/results/`` (for each shape and variant, the most recent run that measured it).

    python scripts/plot_benchmarks.py          # writes benchmarks/*.png and benchmarks/summary.md

* ``schedule_heatmap.png``: rank x step block time (forward + backward, in full blocks) for each
  layout at one shape: the picture that explains striping at a glance.
* ``efficiency.png``: schedule efficiency (ideal / critical path) against tokens per rank.
* ``memory.png``: peak memory per rank against P, and the longest sequence under a cap.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from bench_common import RESULTS, ROOT, parse_shape, read_rows

ORDER = ("striped", "zigzag", "contiguous")


def _latest(rows, key):
    """Keep, for every ``key(row)``, the rows of the most recent run that produced it."""
    best = {}
    for r in rows:
        k = key(r)
        if k not in best or r["run"] > best[k]:
            best[k] = r["run"]
    return [r for r in rows if best[key(r)] == r["run"]]


def _variant_sort(v):
    base = v.split("@")[0]
    return (ORDER.index(base) if base in ORDER else len(ORDER), v)


def schedule_data(path):
    rows = [dict(r, **{"s": parse_shape(r["shape"])}) for r in read_rows(path)]
    rows = _latest(rows, lambda r: (r["variant"], r["s"]["P"], r["s"]["c"]))
    summ = defaultdict(dict)  # (variant, P, c) -> {figure_pass: value}
    cells = defaultdict(float)  # (variant, P, c, rank, step) -> fwd + bwd seconds
    unit = defaultdict(float)  # (P, c) -> full block fwd + bwd seconds
    for r in rows:
        s, v, f, val = r["s"], r["variant"], r["figure"], float(r["value"])
        if f == "block_s" and v == "full_block":
            unit[(s["P"], s["c"])] += val
        elif f == "block_s":
            cells[(v, s["P"], s["c"], s["rank"], s["step"])] += val
        elif "pass_" in s:
            summ[(v, s["P"], s["c"])][f"{f}_{s['pass_']}"] = val
        else:
            summ[(v, s["P"], s["c"])][f] = val
    hw = rows[-1]["hardware"] if rows else ""
    return summ, cells, unit, hw


def plot_heatmap(plt, cells, unit, P, c, out, hw):
    variants = sorted({k[0] for k in cells if k[1] == P and k[2] == c}, key=_variant_sort)
    if not variants:
        return False
    fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 3.6), squeeze=False)
    vmax = max(cells[(v, P, c, r, s)] for v in variants for r in range(P) for s in range(P)) / unit[(P, c)]
    for ax, v in zip(axes[0], variants):
        grid = [[cells[(v, P, c, r, s)] / unit[(P, c)] for s in range(P)] for r in range(P)]
        im = ax.imshow(grid, vmin=0, vmax=vmax, cmap="viridis", origin="upper")
        crit = sum(max(grid[r][s] for r in range(P)) for s in range(P))
        ax.set_title(f"{v}\ncritical path {crit:.2f} (ideal {P / 2:g})", fontsize=9)
        ax.set_xlabel("ring step")
        ax.set_xticks(range(P))
        ax.set_yticks(range(P))
    axes[0][0].set_ylabel("rank")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="block time (full blocks)")
    fig.suptitle(f"fwd+bwd block time per rank and step, P={P}, {c} tokens/rank\n{hw}", fontsize=8)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_efficiency(plt, summ, out, hw):
    Ps = sorted({k[1] for k in summ})
    fig, axes = plt.subplots(1, len(Ps), figsize=(3.6 * len(Ps), 3.3), squeeze=False, sharey=True)
    for ax, P in zip(axes[0], Ps):
        for v in sorted({k[0] for k in summ if k[1] == P}, key=_variant_sort):
            pts = sorted((k[2], d["efficiency_fwdbwd"]) for k, d in summ.items() if k[0] == v and k[1] == P
                         and "efficiency_fwdbwd" in d)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
        ax.axhline(0.95, color="gray", ls="--", lw=0.8)
        cs = sorted({k[2] for k in summ if k[1] == P})
        if cs:  # every striped step is a causal block: 0.5 + 256/c full blocks on the CPU op (README)
            ax.plot(cs, [0.5 / (0.5 + 256 / c) for c in cs], color="gray", ls=":", lw=1,
                    label="0.5 / (0.5 + 256/c)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"P = {P}", fontsize=9)
        ax.set_xlabel("tokens per rank")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fwd+bwd schedule efficiency\n(ideal / critical path)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"dashed: 95% target | {hw}", fontsize=8)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_memory(plt, path, out, hw):
    rows = [dict(r, **{"s": parse_shape(r["shape"])}) for r in read_rows(path)]
    rows = _latest(rows, lambda r: (r["figure"], r["s"]["P"]))
    peak = sorted((r["s"]["P"], float(r["value"]) / 2**20, r["s"]["N"]) for r in rows if r["figure"] == "peak_bytes")
    longest = sorted((r["s"]["P"], float(r["value"]), r["s"]["cap_mib"]) for r in rows
                     if r["figure"] == "max_tokens_under_cap")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    fig.subplots_adjust(wspace=0.4)
    if peak:
        a.plot([p[0] for p in peak], [p[1] for p in peak], marker="o", label="measured")
        a.plot([p[0] for p in peak], [peak[0][1] * peak[0][0] / p[0] for p in peak], ls="--", color="gray",
               label="1/P")
        a.set_xscale("log", base=2)
        a.set_yscale("log", base=2)
        a.set_xlabel("P (processes)")
        a.set_ylabel("peak tensor MiB per rank")
        a.set_title(f"one training step, {peak[0][2]} tokens", fontsize=9)
        a.legend(fontsize=7)
    if longest:
        b.bar([str(p[0]) for p in longest], [p[1] for p in longest])
        b.set_xlabel("P (processes)")
        b.set_ylabel("longest trainable tokens")
        b.set_title(f"under {longest[0][2]} MiB per rank", fontsize=9)
    fig.suptitle(f"tiny Llama, striped ring | {hw}", fontsize=8)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summary_table(summ) -> str:
    lines = ["| P | tokens/rank | layout | efficiency fwd | efficiency fwd+bwd | × contiguous fwd | "
             "× contiguous fwd+bwd | ideal × contiguous (2 − 1/P) |", "|---|---|---|---|---|---|---|---|"]
    for (v, P, c), d in sorted(summ.items(), key=lambda kv: (kv[0][1], kv[0][2], _variant_sort(kv[0][0]))):
        if "efficiency_fwd" not in d:
            continue
        lines.append(
            f"| {P} | {c} | {v} | {d['efficiency_fwd']:.2f} | {d['efficiency_fwdbwd']:.2f} | "
            f"{d.get('ratio_to_contiguous_fwd', float('nan')):.2f} | {d.get('ratio_to_contiguous_fwdbwd', float('nan')):.2f} | "
            f"{2 - 1 / P:.3f} |"
        )
    return "\n".join(lines) + "\n"


def block_cost_table(cells, unit) -> str:
    """Median (rank, step) block cost in full blocks, fwd + bwd: what one ring step costs each
    layout (zigzag and contiguous: steps >= 1, where their blocks are half or whole)."""
    shapes = sorted({(k[1], k[2]) for k in cells})
    variants = sorted({k[0] for k in cells}, key=_variant_sort)
    head = "| P | tokens/rank | " + " | ".join(variants) + " | half block + kv-tile waste: 0.5 + 256/c |"
    lines = [head, "|" + "---|" * (len(variants) + 3)]
    for P, c in shapes:
        row = []
        for v in variants:
            xs = sorted(t / unit[(P, c)] for k, t in cells.items() if k[0] == v and k[1] == P and k[2] == c
                        and (v.startswith("striped") or k[4] >= 1) and t > 0)
            row.append(f"{xs[len(xs) // 2]:.3f}" if xs else "")
        lines.append(f"| {P} | {c} | " + " | ".join(row) + f" | {0.5 + 256 / c:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    ap.add_argument("--heatmap", nargs=2, type=int, default=[8, 2048], metavar=("P", "TOKENS"))
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if (res / "schedule.csv").exists():
        summ, cells, unit, hw = schedule_data(res / "schedule.csv")
        if plot_heatmap(plt, cells, unit, *args.heatmap, out / "schedule_heatmap.png", hw):
            written.append("schedule_heatmap.png")
        plot_efficiency(plt, summ, out / "efficiency.png", hw)
        (out / "summary.md").write_text(summary_table(summ) + "\n" + block_cost_table(cells, unit))
        written += ["efficiency.png", "summary.md"]
    if (res / "memory.csv").exists():
        hw = read_rows(res / "memory.csv")[-1]["hardware"]
        plot_memory(plt, res / "memory.csv", out / "memory.png", hw)
        written.append("memory.png")
    print("wrote " + ", ".join(str(out / w) for w in written))


if __name__ == "__main__":
    main()
