"""Draw the benchmark plots and the README summary table from the CSV rows in
``benchmarks/results/`` (for each shape and variant, the most recent run that measured it).

    python scripts/plot_benchmarks.py          # writes benchmarks/*.png and benchmarks/summary.md

* ``schedule_heatmap.png``: rank x step block time (forward + backward, in full blocks) for each
  layout at one shape: the picture that explains striping at a glance.
* ``efficiency.png``: schedule efficiency (ideal / critical path) against tokens per rank.
* ``memory.png``: peak memory per rank against P, and the longest sequence under a cap.
* ``packed_efficiency.png``: packed documents (``bench_packed.py``), fwd+bwd efficiency (ideal /
  critical path) per mixture against P, one line per layout, one panel per tokens per rank; its
  tables are appended to ``summary.md``.
* ``generate.png``: long-prompt generation (``bench_generate.py``): prefill time, per-token
  decode latency and KV-cache bytes per rank against prompt length, one process against the
  striped ring over P processes; its table is appended to ``summary.md``.
"""

from __future__ import annotations

import argparse
import itertools
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


PACKED_ORDER = ("striped", "striped_plain", "zigzag_padded", "contiguous")
PACKED_MIXES = ("chat", "code", "one_long")


def _packed_sort(v):
    return (PACKED_ORDER.index(v) if v in PACKED_ORDER else len(PACKED_ORDER), v)


def packed_data(path):
    """{(variant, mix, P, c): {figure or figure_pass: value}} from the latest run of each, and the
    hardware of the latest row."""
    rows = [dict(r, **{"s": parse_shape(r["shape"])}) for r in read_rows(path)]
    rows = _latest(rows, lambda r: (r["variant"], r["s"]["mix"], r["s"]["P"], r["s"]["c"]))
    summ = defaultdict(dict)
    for r in rows:
        s, f = r["s"], r["figure"]
        if f == "block_s":
            continue
        key = f"{f}_{s['pass_']}" if "pass_" in s else f
        summ[(r["variant"], s["mix"], s["P"], s["c"])][key] = float(r["value"])
    return summ, (rows[-1]["hardware"] if rows else "")


def plot_packed(plt, summ, out, hw):
    """fwd+bwd efficiency per mixture (rows) and tokens per rank (columns), P on the x axis, one
    line per layout (prototypes are left out: see summary.md)."""
    mixes = [m for m in PACKED_MIXES if any(k[1] == m for k in summ)]
    cs = sorted({k[3] for k in summ})
    fig, axes = plt.subplots(len(mixes), len(cs), figsize=(3.8 * len(cs), 2.9 * len(mixes)), squeeze=False,
                             sharey=True)
    for (i, mix), (j, c) in itertools.product(enumerate(mixes), enumerate(cs)):
        ax = axes[i][j]
        for v in sorted({k[0] for k in summ if k[0] in PACKED_ORDER}, key=_packed_sort):
            pts = sorted((k[2], d["efficiency_fwdbwd"]) for k, d in summ.items()
                         if k[0] == v and k[1] == mix and k[3] == c and "efficiency_fwdbwd" in d)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
        ax.axhline(0.9, color="gray", ls="--", lw=0.8)
        Ps = sorted({k[2] for k in summ})
        ax.set_xscale("log", base=2)
        ax.set_xlim(Ps[0] / 1.25, Ps[-1] * 1.25)
        ax.set_xticks(Ps)
        ax.set_xticklabels([str(p) for p in Ps])
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        once = any(d.get("repeats") == 1 for k, d in summ.items() if k[1] == mix and k[3] == c)
        ax.set_title(f"{mix}, {c} tokens/rank" + (" (one repeat)" if once else ""), fontsize=9)
        if i == len(mixes) - 1:
            ax.set_xlabel("P (ranks)")
        if j == 0:
            ax.set_ylabel("fwd+bwd efficiency\n(ideal / critical path)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"packed documents: ideal = every document alone on one process / P | dashed: 0.9 target\n{hw}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def packed_section(summ) -> str:
    """The packed-documents tables for summary.md: fwd+bwd and fwd efficiency per layout, and the
    prototype placements (not hf-striped) where measured."""
    layouts = sorted({k[0] for k in summ if k[0] in PACKED_ORDER}, key=_packed_sort)
    protos = sorted({k[0] for k in summ if k[0] not in PACKED_ORDER})
    shapes = sorted({k[1:] for k in summ}, key=lambda s: (s[2], s[1], PACKED_MIXES.index(s[0])
                                                           if s[0] in PACKED_MIXES else 9))
    out = ["## Packed documents (scripts/bench_packed.py)", "",
           "Efficiency = ideal / critical path, ideal = the sum of every document's causal attention alone on one "
           "process (one call) / P, on the same kernel in the same run (padding and per-call costs are waste). "
           "`striped` is hf-striped's document placement; `zigzag_padded` pads every document to a multiple of 2P "
           "as ring-flash-attention's zigzag varlen / TransformerEngine THD do; here every layout makes one kernel "
           "call per document piece (the CPU op has no varlen form). `score eff` is the efficiency if time were "
           "proportional to visible scores (balance only). Larger tokens per rank work with `--tokens` but are slow "
           "on a 2-core CPU.", ""]

    def cell(v, mix, P, c, fig, timed=True):
        d = summ.get((v, mix, P, c), {})
        if fig not in d:
            return ""
        return f"{d[fig]:.2f}" + (" †" if timed and d.get("repeats") == 1 else "")

    def table(title, cols, fig, needs=None):
        lines = [title, "", "| mix | P | tokens/rank | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
        for mix, P, c in shapes:
            cells = [cell(v, mix, P, c, fig) for v in cols]
            if any(cells) and (needs is None or any(cell(v, mix, P, c, fig) for v in needs)):
                lines.append(f"| {mix} | {P} | {c} | " + " | ".join(cells) + " |")
        return lines + [""]

    out += table("fwd+bwd efficiency († one repeat; others: median of the run's repeats):", layouts,
                 "efficiency_fwdbwd")
    big = max(k[2] for k in summ)
    lines = [f"P = {big}: fwd / fwd+bwd efficiency, score eff, kernel calls on the fwd+bwd critical path, ring "
             "KiB per step (K and V), padding tokens:", "",
             "| mix | tokens/rank | layout | fwd | fwd+bwd | score eff | calls | ring KiB/step | padding |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mix, P, c in shapes:
        for v in layouts:
            d = summ.get((v, mix, P, c))
            if P != big or not d or "efficiency_fwdbwd" not in d:
                continue
            ring = f"{d['ring_bytes_per_step'] / 1024:.0f}" if d.get("ring_steps", P) > 1 else "none"
            lines.append(f"| {mix} | {c} | {v} | {cell(v, mix, P, c, 'efficiency_fwd')} | "
                         f"{cell(v, mix, P, c, 'efficiency_fwdbwd')} | {cell(v, mix, P, c, 'score_efficiency', False)} | "
                         f"{d.get('kernel_calls_fwdbwd', float('nan')):.0f} | {ring} | {d.get('padding_tokens', 0):.0f} |")
    out += lines + [""]
    if protos:
        cols = ["striped", *protos] if "striped" in layouts else protos
        out += table("Prototype placements (in bench_packed.py only, NOT hf-striped), fwd+bwd efficiency, next to "
                     "`striped` of the same run:", cols, "efficiency_fwdbwd", needs=protos)
    return "\n".join(out)


def _generate_sort(v):
    return (0, 0) if v == "one_process" else (1, int(v.rsplit("cp", 1)[-1]) if v.rsplit("cp", 1)[-1].isdigit() else 0)


def generate_data(path):
    """{(variant, N): {figure: value}} from the latest run of each (per-rank cache bytes are
    left out: ``cache_bytes_per_rank_max`` summarises them), the shape of one row, and the
    hardware of the latest row."""
    rows = [dict(r, **{"s": parse_shape(r["shape"])}) for r in read_rows(path)]
    rows = _latest(rows, lambda r: (r["variant"], r["s"]["N"]))
    summ = defaultdict(dict)
    shape = {}
    for r in rows:
        if "rank" in r["s"]:
            continue
        summ[(r["variant"], r["s"]["N"])][r["figure"]] = float(r["value"])
        shape = r["s"]
    return summ, shape, (rows[-1]["hardware"] if rows else "")


def plot_generate(plt, summ, shape, out, hw):
    variants = sorted({k[0] for k in summ}, key=_generate_sort)
    panels = (("prefill_s", "prefill (s)"), ("decode_ms_per_token", "decode latency (ms / token)"),
              ("cache_bytes_per_rank_max", "KV cache per rank (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4))
    fig.subplots_adjust(wspace=0.35)
    for ax, (fig_name, label) in zip(axes, panels):
        for v in variants:
            pts = sorted((n, d[fig_name]) for (vv, n), d in summ.items() if vv == v and fig_name in d)
            scale = 2**20 if fig_name.startswith("cache") else 1
            ax.plot([p[0] for p in pts], [p[1] / scale for p in pts], marker="o", label=v)
        ax.set_xscale("log", base=2)
        if fig_name != "decode_ms_per_token":
            ax.set_yscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"long-prompt generation, random Llama ({shape.get('layers')} layers, hidden {shape.get('hidden')}, "
                 f"{shape.get('h')} heads / {shape.get('hk')} KV heads), {shape.get('new')} greedy tokens, "
                 f"{shape.get('threads')} thread(s) per process\n{hw}", fontsize=8)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def generate_section(summ, shape) -> str:
    lines = ["## Long-prompt generation (scripts/bench_generate.py)", "",
             f"A random Llama ({shape.get('layers')} layers, hidden {shape.get('hidden')}, {shape.get('h')} heads, "
             f"{shape.get('hk')} KV heads), a random prompt, {shape.get('new')} greedy tokens; every process "
             f"{shape.get('threads')} CPU thread(s). `× one`: the striped variant's figure over `one_process`'s. "
             "Decode: median latency between consecutive new tokens. KV per rank: the largest rank's cache bytes "
             "(one process: its DynamicCache). coll/token: hf-striped collectives per decoded token (all-gathers, "
             "one per layer). match: the CP tokens equal one process's.", "",
             "| prompt | variant | prefill s | × one | decode ms/token | × one | KV MiB per rank | × one | coll/token | match |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (v, n), d in sorted(summ.items(), key=lambda kv: (kv[0][1], _generate_sort(kv[0][0]))):
        if "prefill_s" not in d:
            continue

        def ratio(fig, fmt=".2f"):
            return format(d[fig], fmt) if fig in d else ""

        match = "" if "tokens_match_one_process" not in d else ("yes" if d["tokens_match_one_process"] else "NO")
        lines.append(f"| {n} | {v} | {d['prefill_s']:.2f} | {ratio('prefill_ratio_to_one_process')} | "
                     f"{d['decode_ms_per_token']:.1f} | {ratio('decode_ratio_to_one_process')} | "
                     f"{d['cache_bytes_per_rank_max'] / 2**20:.1f} | {ratio('cache_ratio_to_one_process', '.3f')} | "
                     f"{d.get('collectives_per_token', 0):.0f} | {match} |")
    return "\n".join(lines) + "\n"


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
    written, summary = [], []
    if (res / "schedule.csv").exists():
        summ, cells, unit, hw = schedule_data(res / "schedule.csv")
        if plot_heatmap(plt, cells, unit, *args.heatmap, out / "schedule_heatmap.png", hw):
            written.append("schedule_heatmap.png")
        plot_efficiency(plt, summ, out / "efficiency.png", hw)
        summary.append(summary_table(summ) + "\n" + block_cost_table(cells, unit))
        written.append("efficiency.png")
    if (res / "packed.csv").exists():
        psumm, hw = packed_data(res / "packed.csv")
        plot_packed(plt, psumm, out / "packed_efficiency.png", hw)
        summary.append(packed_section(psumm))
        written.append("packed_efficiency.png")
    if (res / "generate.csv").exists():
        gsumm, gshape, hw = generate_data(res / "generate.csv")
        plot_generate(plt, gsumm, gshape, out / "generate.png", hw)
        summary.append(generate_section(gsumm, gshape))
        written.append("generate.png")
    if summary:
        (out / "summary.md").write_text("\n".join(summary))
        written.append("summary.md")
    if (res / "memory.csv").exists():
        hw = read_rows(res / "memory.csv")[-1]["hardware"]
        plot_memory(plt, res / "memory.csv", out / "memory.png", hw)
        written.append("memory.png")
    print("wrote " + ", ".join(str(out / w) for w in written))


if __name__ == "__main__":
    main()
