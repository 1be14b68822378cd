"""A pool of real ``torch.distributed`` (gloo) worker processes for multi-process tests.

Spawning processes and importing torch/transformers costs seconds, so each world size gets one
pool per test session, and tests send it work: a module-level function ``fn(rank, world, *args)``
that every rank runs. Exceptions in any rank come back as the test's failure with the remote
traceback; a pool whose run failed or timed out is torn down (its peers may be stuck in a ring)
and a fresh one is started for the next test.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tasks, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=90),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world, *args)))
        except BaseException:  # noqa: BLE001 - everything goes back to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results), daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.healthy = True

    def run(self, fn, *args, timeout: float = 300.0) -> list:
        """Run ``fn(rank, world, *args)`` on every rank; return the results in rank order."""
        assert self.healthy, "this pool failed earlier"
        for q in self.tasks:
            q.put((fn, args))
        out, errors = {}, []
        try:
            for _ in range(self.world_size):
                rank, ok, value = self.results.get(timeout=timeout)
                if ok:
                    out[rank] = value
                else:
                    errors.append(f"--- rank {rank} ---\n{value}")
                    break  # peers may now wait forever; don't wait for them
        except queue.Empty:
            dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
            errors.append(f"timed out after {timeout}s waiting for ranks {sorted(set(range(self.world_size)) - set(out))}"
                          + (f"; dead ranks {dead}" if dead else ""))
        if errors:
            self.close()
            raise AssertionError(f"{fn.__name__} failed in the {self.world_size}-process gloo group:\n" + "\n".join(errors))
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        self.healthy = False
        for q in self.tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
