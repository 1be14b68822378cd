"""Soak test: context-parallel training that is killed again and again, and must end exactly where
an uninterrupted run ends.

    python scripts/soak.py --faults 16 --steps 60

A tiny random Llama trains with CP = 2 (two gloo processes started directly, without a launcher
agent that would tear the group down for us) on rows of random lengths (``train.py --no-pack``),
checkpointing every few steps. Again and again the soak picks a moment (during start-up, during
training, or while a checkpoint is being written) and a fault: SIGKILL one rank, SIGKILL both, or
SIGSTOP one rank (a stuck process). Each time it checks that

* every surviving rank exits by itself within ``--timeout`` (+ a margin for start-up), with an
  error naming what it was waiting for, instead of hanging;
* the rerun (``--resume auto``) resumes from the newest complete checkpoint.

After ``--faults`` faults the run is let finish, and its loss trajectory must equal (bit for bit)
that of an uninterrupted run with the same seed. Rows of every fault go to ``faults.csv``, the
totals to ``summary.json``, and ``soak.png`` shows progress over time with the faults marked.
Exit status 0 only if nothing hung and the trajectories match.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
KINDS = ("kill rank 0", "kill rank 1", "kill both", "stall rank 0", "stall rank 1")
MOMENTS = ("start-up", "training", "saving")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default="outputs/soak")
    p.add_argument("--faults", type=int, default=16, help="faults to inject before letting the run finish")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of the training run")
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128, help="longest row (rows have random lengths 2..seq-len)")
    p.add_argument("--timeout", type=float, default=10.0, help="train.py --timeout and --pg-timeout: how long a rank waits for a peer")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the model, training and the fault schedule")
    p.add_argument("--max-minutes", type=float, default=20.0, help="stop injecting faults after this long")
    args = p.parse_args(argv)
    if args.faults < 0 or args.steps < 1 or args.save_every < 1 or args.seq_len < 4 or args.timeout <= 0:
        p.error("--faults >= 0, --steps >= 1, --save-every >= 1, --seq-len >= 4 and --timeout > 0 are required")
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inputs(workdir: Path, seq_len: int, seed: int) -> tuple[Path, Path]:
    """A tiny random Llama (safetensors) and a jsonl of token rows of random lengths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir, data = workdir / "model", workdir / "data.jsonl"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(seed)
    with data.open("w") as f:
        for _ in range(400):
            f.write(json.dumps({"input_ids": [rng.randrange(3, 128) for _ in range(rng.randint(2, seq_len))]}) + "\n")
    return model_dir, data


class Launch:
    """One start of the two ranks of the CP = 2 run, each writing its log to a file."""

    def __init__(self, idx: int, args, model_dir: Path, data: Path, out: Path, logs: Path):
        self.idx, self.out = idx, out
        port = _free_port()
        cmd = [sys.executable, str(TRAIN), "--model", str(model_dir), "--data", str(data), "--no-pack",
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--save-every", str(args.save_every),
               "--keep-checkpoints", "2", "--batch-size", "2", "--grad-accum", "2", "--output-dir", str(out), "--cp-size", "2", "--seed", str(args.seed),
               "--timeout", str(args.timeout), "--pg-timeout", str(args.timeout), "--check-finite", "--no-progress", "--resume", "auto"]
        self.logs = [logs / f"launch{idx:03d}-rank{r}.log" for r in range(2)]
        self.procs = []
        for r in range(2):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(r),
                       LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
            env.pop("PYTHONPATH", None)
            with self.logs[r].open("w") as f:
                self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                                   start_new_session=True))
        self.started = time.monotonic()

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def last_step(self) -> int:
        steps = re.findall(r"\[train\] step (\d+)/", self.log(0))
        return int(steps[-1]) if steps else 0

    def alive(self) -> list[bool]:
        return [p.poll() is None for p in self.procs]

    def kill(self, rank: int, sig=signal.SIGKILL) -> None:
        try:
            os.kill(self.procs[rank].pid, sig)
        except ProcessLookupError:
            pass

    def wait_all(self, limit: float) -> bool:
        end = time.monotonic() + limit
        while time.monotonic() < end and any(self.alive()):
            time.sleep(0.05)
        return not any(self.alive())


def _saving(out: Path) -> bool:
    ckpt = out / "checkpoints"
    return ckpt.is_dir() and any(p.name.startswith(".step-") for p in ckpt.iterdir())


def _first_error(text: str) -> str:
    for pattern in (r"RingCommError: (.*)", r"DistBackendError: (.*)", r"RuntimeError: (.*)", r"(\w+Error: .*)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)[:300]
    return ""


def run_clean(args, model_dir, data, out: Path, logs: Path, idx: int) -> Launch:
    launch = Launch(idx, args, model_dir, data, out, logs)
    if not launch.wait_all(600):
        for r in range(2):
            launch.kill(r)
        raise SystemExit(f"[soak] launch {idx} did not finish in 10 minutes; see {launch.logs[0]}")
    codes = [p.returncode for p in launch.procs]
    if codes != [0, 0]:
        raise SystemExit(f"[soak] launch {idx} failed with exit codes {codes}; see {launch.logs[0]}:\n{launch.log(0)[-3000:]}")
    return launch


@dataclass
class StartupTime:
    """Seconds from a launch to its first step (imports, the process group, data, the resume):
    the window in which start-up faults land. A first guess, lowered as launches are timed."""

    seconds: float = 4.0


@dataclass(frozen=True)
class Plan:
    """One fault to inject: its ``kind`` (KINDS), its ``moment`` (MOMENTS), the step it aims at
    (``target``; 0 at start-up) and ``delay``: seconds after the launch (start-up) or after the
    target step was logged (training)."""

    kind: str
    moment: str
    target: int
    delay: float


def _newest_complete(out: Path) -> int:
    """Step of the newest complete checkpoint (0 if none): where the next launch resumes."""
    ckpt = out / "checkpoints"
    steps = [int(p.name[5:]) for p in ckpt.glob("step-*") if (p / "trainer_state.json").is_file()] if ckpt.is_dir() else []
    return max(steps, default=0)


def plan_fault(start: int, rng: random.Random, args, startup_s: float) -> Plan:
    """Draw a random fault for a launch that resumes from step ``start``."""
    kind, moment = rng.choice(KINDS), rng.choices(MOMENTS, weights=(1, 2, 2))[0]
    # Aim within the next few checkpoints (so the faults spread over the whole run), and not at
    # the very end (a fault aimed there could come after the run finished).
    last = min(args.steps - 3, start + 3 * args.save_every)
    saves = [s for s in range(start + 1, last + 1) if s % args.save_every == 0]
    if moment == "saving" and not saves:
        moment = "training"
    if moment == "training" and start + 1 > last:
        moment = "start-up"
    # start-up: before the first step (imports, the process group, data, the resume); training:
    # within the step after the target one (a step takes a few tens of ms here)
    delay = rng.uniform(0.3, 0.9) * startup_s if moment == "start-up" else rng.uniform(0.0, 0.05)
    target = rng.choice(saves) if moment == "saving" else rng.randint(start + 1, last) if moment == "training" else 0
    return Plan(kind, moment, target, delay)


def wait_for_moment(launch: Launch, plan: Plan, start: int, startup: StartupTime) -> str | None:
    """Wait until ``launch`` (resumed from step ``start``) reaches the moment of ``plan``; return
    that moment, ``"training"`` if a save was over before it was seen (the fault then lands just
    after it), or ``None`` if the run finished first. Times the launch's start-up into ``startup``."""
    moment, reached = plan.moment, None
    while True:
        if not all(launch.alive()):
            if not any(launch.alive()) and [p.returncode for p in launch.procs] == [0, 0]:
                return None
            if not any(launch.alive()):
                raise SystemExit(f"[soak] launch {launch.idx} failed on its own:\n{launch.log(0)[-3000:]}")
        if moment == "start-up":
            if time.monotonic() - launch.started >= plan.delay:
                return moment
        elif reached is None:
            if launch.last_step() >= plan.target:  # rank 0 logs a step, then saves its checkpoint
                reached = time.monotonic()
                if plan.target == start + 1:  # the first step of this launch: how long start-up takes
                    startup.seconds = min(startup.seconds, reached - launch.started)
        elif moment == "training":
            if time.monotonic() - reached >= plan.delay:
                return moment
        elif _saving(launch.out):  # (leftovers of killed saves were removed at start-up)
            return moment
        elif time.monotonic() - reached > 0.5:
            return "training"
        time.sleep(0.0005 if reached is not None and moment == "saving" else 0.01)


def strike(launch: Launch, kind: str, moment: str, args) -> dict:
    """Inject fault ``kind`` into ``launch`` now; wait (up to the timeout + 60 s) for the surviving
    rank to exit by itself, then kill what is left. Returns the fault's record."""
    step = launch.last_step()
    victims = [0, 1] if kind == "kill both" else [int(kind[-1])]
    sig = signal.SIGSTOP if kind.startswith("stall") else signal.SIGKILL
    t0 = time.monotonic()
    for r in victims:
        launch.kill(r, sig)
    during_save = moment != "start-up" and _saving(launch.out)  # (at start-up: a killed save's leftovers)
    survivors = [r for r in (0, 1) if r not in victims]
    limit = args.timeout + 60  # the timeout, plus start-up (imports) on two busy cores
    exit_s, codes, error = None, [], ""
    while time.monotonic() - t0 < limit and any(launch.procs[r].poll() is None for r in survivors):
        time.sleep(0.05)
    hung = [r for r in survivors if launch.procs[r].poll() is None]
    if survivors and not hung:
        exit_s = time.monotonic() - t0
        codes = [launch.procs[r].returncode for r in survivors]
        error = _first_error(launch.log(survivors[0]))
    for r in (0, 1):  # the stalled victim, and any rank that hung
        launch.kill(r, signal.SIGKILL)
    launch.wait_all(30)
    return dict(launch=launch.idx, fault=kind, moment=moment, step=step, during_save=during_save,
                survivor_exit_s=None if exit_s is None else round(exit_s, 2), survivor_exit_codes=codes,
                hung_ranks=hung, survivor_error=error)


def inject(launch: Launch, rng: random.Random, args, startup: StartupTime) -> dict | None:
    """Wait for a random moment of ``launch`` and inject a random fault; ``None`` if the run
    finished first. Returns the fault's record once every survivor has exited.

    Moments: a random time during start-up (``startup`` estimates how long it lasts); right after
    a random step still to come; or while the checkpoint of a random checkpoint step still to come
    is being written (if that save is over before it is seen, the fault lands just after it:
    recorded as "training")."""
    start = _newest_complete(launch.out)
    plan = plan_fault(start, rng, args, startup.seconds)
    moment = wait_for_moment(launch, plan, start, startup)
    return None if moment is None else strike(launch, plan.kind, moment, args)


def _losses(out: Path) -> list[float]:
    return json.loads((out / "final" / "training_log.json").read_text())["losses"]


def _rng_states(out: Path) -> dict[int, str]:
    """Step -> fingerprint of rank 0's torch RNG state after it (train.py's log.jsonl)."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["rng"] for r in rows}


def _resumed_from(launch: Launch) -> int | None:
    m = re.search(r"resumed from \S*step-(\d+)", launch.log(0))
    return int(m.group(1)) if m else None


def plot(path: Path, timeline: list[tuple[float, int]], faults: list[dict], fault_times: list[float]) -> bool:
    from hf_striped.tools.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if timeline:
        t, s = zip(*timeline)
        ax.plot(t, s, "o-", ms=3, label="step the run had reached at each fault")
    colours = {"kill": "tab:red", "stall": "tab:orange"}
    for f, t in zip(faults, fault_times):
        ax.axvline(t, color=colours[f["fault"].split()[0]], alpha=0.5, lw=1)
    ax.plot([], [], color="tab:red", label="SIGKILL")
    ax.plot([], [], color="tab:orange", label="SIGSTOP (stuck rank)")
    ax.set_xlabel("seconds since the soak run started")
    ax.set_ylabel("training step")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@dataclass
class Soak:
    """One soak run: its arguments and inputs, and what it records as it goes (the faults and
    when they came, the step reached at each, the steps launches resumed from)."""

    args: argparse.Namespace
    work: Path
    model_dir: Path
    data: Path
    faults: list[dict] = field(default_factory=list)
    fault_times: list[float] = field(default_factory=list)
    timeline: list[tuple[float, int]] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)
    startup: StartupTime = field(default_factory=StartupTime)
    next_launch: int = 1  # launch 0 is the uninterrupted run
    t_start: float = 0.0  # when fault injection began

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def out(self) -> Path:
        return self.work / "interrupted"

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def note_resume(self, launch: Launch) -> int | None:
        """The step ``launch`` resumed from (None: from scratch), recorded."""
        resumed = _resumed_from(launch)
        if resumed is not None:
            self.resumes.append(resumed)
        return resumed


def setup(args) -> Soak:
    """A fresh work folder with the model and data, and the soak's opening line."""
    work = Path(args.workdir)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    model_dir, data = make_inputs(work, args.seq_len, args.seed)
    print(f"[soak] CP = 2, {args.steps} steps, rows of 2..{args.seq_len} tokens, checkpoint every {args.save_every} "
          f"steps, timeout {args.timeout:g} s, {args.faults} faults; work folder {work}", flush=True)
    return Soak(args, work, model_dir, data)


def run_reference(soak: Soak) -> list[float]:
    """The uninterrupted run (launch 0): the loss trajectory the interrupted one must end on."""
    t = time.monotonic()
    run_clean(soak.args, soak.model_dir, soak.data, soak.work / "uninterrupted", soak.logs, 0)
    reference = _losses(soak.work / "uninterrupted")
    print(f"[soak] uninterrupted run: {len(reference)} steps in {time.monotonic() - t:.0f} s, final loss {reference[-1]:.6f}",
          flush=True)
    return reference


def _launch_problem(launch: Launch, record: dict | None, resumed: int | None, expected: int, logs: Path) -> str | None:
    """What went wrong with a launch that met a fault, if anything: it resumed from another step
    than the newest complete checkpoint ``expected``, or a surviving rank exited without failing."""
    if (resumed or 0) != expected and (resumed is not None or launch.last_step() > 0):
        return (f"launch {launch.idx} resumed from step {resumed or 0}, but the newest complete "
                f"checkpoint was step {expected}; see {launch.logs[0]}")
    if record is not None and record["survivor_exit_s"] is not None and (
            0 in record["survivor_exit_codes"] or not record["survivor_error"]):
        return (f"after '{record['fault']}' a surviving rank exited with {record['survivor_exit_codes']} "
                f"and error {record['survivor_error']!r}: it must fail, saying why; see {logs}")
    return None


def _fault_loop(soak: Soak, rng: random.Random, bar) -> str | None:
    """Launch, fault, relaunch until --faults faults (or --max-minutes, or the run finished first);
    returns what went wrong, or None."""
    args = soak.args
    while len(soak.faults) < args.faults and soak.elapsed() < args.max_minutes * 60:
        expected = _newest_complete(soak.out)  # where this launch must resume
        launch = Launch(soak.next_launch, args, soak.model_dir, soak.data, soak.out, soak.logs)
        soak.next_launch += 1
        record = inject(launch, rng, args, soak.startup)
        resumed = soak.note_resume(launch)
        problem = _launch_problem(launch, record, resumed, expected, soak.logs)
        if problem:
            return problem
        soak.timeline.append((soak.elapsed(), max(launch.last_step(), expected)))
        if record is None:  # the run finished before the fault came
            return None
        record["resumed_from"] = resumed
        soak.faults.append(record)
        soak.fault_times.append(soak.elapsed())
        bar.update(1)
        bar.set_postfix(last=f"{record['fault']} @ {record['moment']} step {record['step']}")
        if record["hung_ranks"]:
            return (f"ranks {record['hung_ranks']} still waiting {args.timeout + 60:g} s after "
                    f"'{record['fault']}'; see {soak.logs}")
    return None


def inject_faults(soak: Soak) -> str | None:
    """The interrupted run, fault after fault (seeded by --seed); returns what went wrong, or None."""
    from tqdm.auto import tqdm

    soak.t_start = time.monotonic()
    bar = tqdm(total=soak.args.faults, desc="faults", unit="fault", dynamic_ncols=True)
    try:
        return _fault_loop(soak, random.Random(soak.args.seed), bar)
    finally:
        bar.close()


def finish(soak: Soak) -> list[float]:
    """Let the interrupted run finish, resuming once more (unless it already has); its losses."""
    if not (soak.out / "final").exists():
        launch = run_clean(soak.args, soak.model_dir, soak.data, soak.out, soak.logs, soak.next_launch)
        soak.note_resume(launch)
        soak.timeline.append((soak.elapsed(), soak.args.steps))
    return _losses(soak.out)


def _report(soak: Soak) -> None:
    """Print how many faults of each kind came, and how fast the survivors exited."""
    faults, timeout = soak.faults, soak.args.timeout
    survived = [f["survivor_exit_s"] for f in faults if f["survivor_exit_s"] is not None]
    print(f"[soak] {len(faults)} faults ({sum(f['fault'].startswith('kill') for f in faults)} kills, "
          f"{sum(f['fault'].startswith('stall') for f in faults)} stalls; {sum(f['during_save'] for f in faults)} "
          f"during a checkpoint save), {len(soak.resumes)} resumes from a checkpoint", flush=True)
    if survived:
        print(f"[soak] surviving ranks exited by themselves {min(survived):.1f}..{max(survived):.1f} s after the "
              f"fault (timeout {timeout:g} s)", flush=True)


def verdict(soak: Soak, reference: list[float], losses: list[float]) -> int:
    """Compare the interrupted run with the uninterrupted one (losses and RNG states, bit for bit),
    write the plot and summary, print the result; returns the exit status."""
    steps = soak.args.steps
    rng_ref, rng_soak = _rng_states(soak.work / "uninterrupted"), _rng_states(soak.out)
    rng_ok = rng_soak == rng_ref and len(rng_ref) == steps
    if not rng_ok:
        bad = [s for s in range(1, steps + 1) if rng_ref.get(s) != rng_soak.get(s)]
        print(f"[soak] FAIL: the torch RNG state after steps {bad[:10]} differs from the uninterrupted run's", flush=True)
    ok = losses == reference and rng_ok
    plot(soak.work / "soak.png", soak.timeline, soak.faults, soak.fault_times)
    _write(soak.work, soak.args, soak.faults, reference, losses, soak.resumes, ok=ok)
    _report(soak)
    if ok:
        print(f"[soak] OK: the interrupted run's {len(losses)} losses and RNG states equal the uninterrupted run's bit "
              "for bit", flush=True)
        return 0
    diff = next(i for i, (a, b) in enumerate(zip(losses, reference)) if a != b) if len(losses) == len(reference) else None
    print(f"[soak] FAIL: loss trajectories differ (first at step {None if diff is None else diff + 1}; lengths "
          f"{len(losses)} vs {len(reference)})", flush=True)
    return 1


def main(argv=None) -> int:
    """The uninterrupted run, then the interrupted one to the end; 0 only if nothing hung and the
    two trajectories are equal."""
    args = parse_args(argv)
    soak = setup(args)
    reference = run_reference(soak)
    problem = inject_faults(soak)
    if problem:
        print(f"[soak] FAIL: {problem}", flush=True)
        _write(soak.work, args, soak.faults, reference, None, soak.resumes, ok=False)
        return 1
    return verdict(soak, reference, finish(soak))


def _write(work: Path, args, faults, reference, soak, resumes, ok: bool) -> None:
    if faults:
        with (work / "faults.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(faults[0]))
            w.writeheader()
            for row in faults:
                w.writerow(row)
    summary = dict(ok=ok, faults=len(faults), kills=sum(f["fault"].startswith("kill") for f in faults),
                   stalls=sum(f["fault"].startswith("stall") for f in faults),
                   during_save=sum(bool(f["during_save"]) for f in faults), resumes=len(resumes),
                   resumed_from_steps=resumes, timeout_s=args.timeout, steps=args.steps,
                   max_survivor_exit_s=max((f["survivor_exit_s"] or 0 for f in faults), default=None),
                   reference_losses=reference, interrupted_losses=soak)
    (work / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    sys.exit(main())
