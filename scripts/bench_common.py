"""Shared by the benchmark scripts: results are data, one CSV row per
measured figure with the date, hardware, versions, variant and shape it belongs to."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = ("date", "run", "hardware", "versions", "bench", "variant", "shape", "figure", "value")

# Let `python scripts/bench_*.py` import hf_striped from this checkout when it is not installed.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def hardware(device: str = "cpu") -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    from hf_striped.tools.model_card import cpu_name

    return f"{cpu_name()}; {os.cpu_count()} cores; {torch.get_num_threads()} torch threads"


def versions() -> str:
    import hf_striped

    out = f"python={platform.python_version()};torch={torch.__version__};hf_striped={hf_striped.__version__}"
    try:
        import transformers

        out += f";transformers={transformers.__version__}"
    except ImportError:  # pragma: no cover
        pass
    return out


def add_block_args(ap) -> None:
    """The block benchmarks' shape, kernel and timing options (bench_schedule, bench_packed), and
    ``--clock``; :func:`finish_block_args` resolves the clock and sets the CPU threads."""
    from hf_striped.kernels import BACKENDS

    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared machine oversubscribed OpenMP threads "
                         "spin and distort timings far more than plain time sharing)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="cpu: this process's CPU time (default on the CPU: a machine shared with other work "
                         "then slows no block); wall: elapsed time (default on CUDA, with synchronisation)")


def finish_block_args(args) -> None:
    args.clock = args.clock or ("wall" if args.device == "cuda" else "cpu")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)


def add_llama_args(ap, *, hidden, intermediate, layers, heads, kv_heads, vocab) -> None:
    """The random Llama's shape options, shared by the end-to-end and memory benchmarks."""
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--intermediate", type=int, default=intermediate)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--kv-heads", type=int, default=kv_heads)
    ap.add_argument("--vocab", type=int, default=vocab)


def llama_config(args, max_len: int):
    """A random-Llama config from :func:`add_llama_args` options, for sequences up to ``max_len``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(max_len, 2048), attention_dropout=0.0, pad_token_id=0,
    )


def shape_str(**kw) -> str:
    """``key=value;...``: the shape column (parsed back by :func:`parse_shape`)."""
    return ";".join(f"{k}={v}" for k, v in kw.items())


def parse_shape(s: str) -> dict:
    out = {}
    for part in s.split(";"):
        if part:
            k, v = part.split("=", 1)
            try:
                out[k] = int(v)
            except ValueError:
                out[k] = v
    return out


class Recorder:
    """Collects rows of one benchmark run and appends them to ``path``."""

    def __init__(self, bench: str, path: Path, device: str = "cpu"):
        self.bench, self.path = bench, Path(path)
        now = datetime.datetime.now(datetime.timezone.utc)
        self.date = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.run = now.strftime("%Y%m%d%H%M%S") + f"-{os.getpid()}"
        self.hardware, self.versions = hardware(device), versions()
        self.rows: list[dict] = []

    def add(self, variant: str, shape: str, figure: str, value: float) -> None:
        self.rows.append(
            dict(date=self.date, run=self.run, hardware=self.hardware, versions=self.versions, bench=self.bench,
                 variant=variant, shape=shape, figure=figure, value=f"{value:.6g}")
        )

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(self.rows)
        return self.path


def read_rows(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def timed(fn, sync=None, clock=time.perf_counter) -> float:
    """Seconds one call of ``fn`` takes on ``clock`` (``sync`` before and after, e.g.
    cuda.synchronize). ``time.process_time`` measures the CPU time this process spends, which
    on a machine shared with other work is the block's cost without the waits for a core."""
    if sync:
        sync()
    t0 = clock()
    fn()
    if sync:
        sync()
    return clock() - t0


def median(xs) -> float:
    return statistics.median(xs)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world: int, *args, timeout: float = 3600) -> dict:
    """Run ``target(rank, world, port, *args, queue)`` in ``world`` spawned processes; each puts
    ``(rank, result)`` on the queue. Returns ``{rank: result}``; raises if any process dies."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results, t0 = {}, time.perf_counter()
    try:
        while len(results) < world:
            try:
                rank, res = q.get(timeout=2)
                results[rank] = res
            except queue_mod.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.perf_counter() - t0 > timeout:
                    raise SystemExit(f"a benchmark process failed (exit codes {[p.exitcode for p in procs]})")
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return results
