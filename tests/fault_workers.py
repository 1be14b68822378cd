"""Workers for tests/test_faults.py: a real gloo group of fresh processes in which one rank
dies (SIGKILL) or stalls (SIGSTOP) at a chosen ring step, forward or backward, while the others
run ring attention with a short timeout. Each survivor reports what it raised and how long it
took; the test asserts on those reports."""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
import traceback


def _die_at(phase: str, step: int, how: str):
    """Ring hooks that make this process die or stall when its ring reaches ``step`` of ``phase``."""
    from hf_striped import RingHooks

    def on_step(phase_: str, step_: int, _name) -> None:
        if phase_ == phase and step_ == step:
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)

    return RingHooks(on_step=on_step)


def ring_fault_worker(rank: int, world: int, port: int, victim: int, phase: str, step: int, how: str,
                      timeout: float, report_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # The process group's own timeout is long: what must end the wait is hf_striped's.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    from hf_striped import RingOptions, ring_attention

    torch.manual_seed(0)
    q = torch.randn(1, 64, 4, 16, requires_grad=True)
    k = torch.randn(1, 64, 2, 16, requires_grad=True)
    v = torch.randn(1, 64, 2, 16, requires_grad=True)
    ring_attention(q, k, v, group=dist.group.WORLD, timeout=timeout).sum().backward()  # a clean round first
    options = RingOptions(timeout=timeout, hooks=_die_at(phase, step, how) if rank == victim else None)
    t0 = time.monotonic()
    report = {"rank": rank}
    try:
        ring_attention(q, k, v, group=dist.group.WORLD, options=options).sum().backward()
        report["raised"] = None
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report.update(raised=type(exc).__name__, message=str(exc), phase=getattr(exc, "phase", None),
                      step=getattr(exc, "step", None), peer=getattr(exc, "peer", None),
                      timed_out=getattr(exc, "timed_out", None), trace=traceback.format_exc()[-3000:])
    report["seconds"] = time.monotonic() - t0
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    # Return normally, with the broken process group still alive, as a training script whose
    # exception propagates would: the test checks that this process then ends by itself.


def mismatched_qkv(rank: int, world: int, field: str):
    """Rank 1 calls the ring with a different ``field`` than its peers; returns what each raised."""
    import torch
    import torch.distributed as dist

    from hf_striped import ring_attention

    shape = dict(batch=2, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    if rank == 1 and field == "kv_heads_not_dividing":  # refused by rank 1's own checks
        shape["kv_heads"] = 3
    elif rank == 1:
        shape[field] = torch.float64 if field == "dtype" else shape[field] * 2
    q = torch.randn(shape["batch"], 32, shape["heads"], shape["head_dim"], dtype=shape["dtype"])
    kv = torch.randn(shape["batch"], 32, shape["kv_heads"], shape["head_dim"], dtype=shape["dtype"])
    t0 = time.monotonic()
    try:
        ring_attention(q, kv, kv, group=dist.group.WORLD, timeout=60)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc), time.monotonic() - t0
    return None, "", time.monotonic() - t0


def _poison(phase: str, step: int, layer: int):
    """Ring hooks under which the block results of ring ``step`` of ``phase`` in the attention
    of ``layer`` carry a NaN when the finite guard looks at them (as if the kernel had produced
    one)."""
    from hf_striped import RingHooks

    def on_block(phase_: str, step_: int, name, results: dict) -> None:
        if phase_ == phase and step_ == step and (name or "").endswith(f"layer {layer}"):
            first = next(iter(results))
            results[first] = results[first].clone()  # the guard's view only
            results[first].view(-1)[7] = float("nan")

    return RingHooks(on_block=on_block)


def nan_in_block(rank: int, world: int, model_dir: str, phase: str, victim: int, step: int, layer: int):
    """A real tiny Llama under context_parallel(check_finite=True, train_step=7) on ``world``
    gloo ranks; on ``victim``, the block at ring ``step`` of ``layer`` reports a NaN. Returns
    what each rank raised: the victim's NonFiniteError, its peers' RingCommError (short timeout)."""
    import torch
    import torch.distributed as dist

    import hf_striped
    from models import load

    torch.manual_seed(0)
    model = load(model_dir, "striped_ring")
    ids = torch.randint(3, 100, (1, 16 * world))
    pos = torch.arange(ids.shape[1]).expand(1, -1)
    group = dist.group.WORLD
    local = hf_striped.shard(ids, dim=1, group=group)
    local_pos = hf_striped.shard(pos, dim=1, group=group)
    options = hf_striped.RingOptions(check_finite=True, timeout=5,
                                      hooks=_poison(phase, step, layer) if rank == victim else None)
    t0 = time.monotonic()
    try:
        with hf_striped.context_parallel(group, options=options, train_step=7):
            out = model(input_ids=local, position_ids=local_pos, use_cache=False)
            out.logits.float().pow(2).mean().backward()
    except Exception as exc:  # noqa: BLE001
        return dict(raised=type(exc).__name__, message=str(exc), seconds=time.monotonic() - t0,
                    **{k: getattr(exc, k, None) for k in ("rank", "step", "train_step", "where")})
    return dict(raised=None, seconds=time.monotonic() - t0)


def model_mismatch(rank: int, world: int, model_dir: str, other_dir: str, what: str):
    """Real tiny Llamas inside context_parallel where rank 1 differs: ``"model"`` (another
    config: more key/value heads) or ``"positions"`` (positions sharded with another layout).
    Returns what each rank raised: every rank must raise, none may wait."""
    import torch
    import torch.distributed as dist

    import hf_striped
    from models import load

    model = load(other_dir if (rank == 1 and what == "model") else model_dir, "striped_ring")
    ids = torch.randint(3, 100, (1, 16 * world))
    pos = torch.arange(ids.shape[1]).expand(1, -1)
    group = dist.group.WORLD
    local, local_pos = hf_striped.shard(ids, dim=1, group=group), hf_striped.shard(pos, dim=1, group=group)
    if rank == 1 and what == "positions":  # sharded with another layout than the context's
        local_pos = hf_striped.shard(pos, dim=1, group=group, layout="contiguous")
    if rank == 1 and what == "dropout":  # refused by rank 1's own checks, before any collective
        model.config.attention_dropout = 0.1
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
    model.train(what == "dropout")
    t0 = time.monotonic()
    try:
        with torch.set_grad_enabled(what == "dropout"), hf_striped.context_parallel(group, timeout=60):
            model(input_ids=local, position_ids=local_pos, use_cache=False)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc), time.monotonic() - t0
    return None, "", time.monotonic() - t0


def save_fails_on_main(rank: int, world: int, root: str):
    """hf_striped.training.checkpoint.save_checkpoint where the main process's weight write fails (a full
    disk, injected through the ``io`` hooks): every rank must raise at once, and the previous
    checkpoint must stay intact."""
    import torch
    import torch.distributed as dist

    from hf_striped.training.checkpoint import CheckpointIO, save_checkpoint

    class Acc:  # what save_checkpoint uses of accelerate.Accelerator
        is_main_process, process_index, device = rank == 0, rank, torch.device("cpu")

        def wait_for_everyone(self):
            dist.barrier()

        def unwrap_model(self, m):
            return m

    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(Acc(), root, 1, {"losses": []}, model=model, optimizer=opt)  # a good one first

    def full_disk(model, path):
        raise OSError(28, "No space left on device")

    t0 = time.monotonic()
    try:
        save_checkpoint(Acc(), root, 2, {"losses": []}, model=model, optimizer=opt, io=CheckpointIO(write_weights=full_disk))
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc), time.monotonic() - t0
    return None, "", time.monotonic() - t0
