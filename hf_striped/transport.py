"""How ring messages move. The ring schedule (``schedule.py``) is written once, as a generator
per rank that yields :class:`Post` ("send these tensors to the next rank and receive the same
shapes from the previous one") and :class:`Wait` ("give me what that post received"). A driver
runs it:

* :func:`run_dist`: one rank per process over ``torch.distributed`` point-to-point
  (``batch_isend_irecv``; gloo on CPU, NCCL on GPU). Posts return at once, so communication
  overlaps the compute that follows until the matching ``Wait``.
* :func:`run_inprocess`: P virtual ranks in one process, interleaved cooperatively at their
  ``Wait`` points. Used by tests and benchmarks: deterministic, and one block runs at a time so
  per-block timings are clean.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Post:
    """Send ``tensors`` to rank + 1 and receive tensors of the same shapes from rank - 1."""

    tensors: tuple[torch.Tensor, ...]


@dataclass
class Wait:
    """Block until the post identified by ``ticket`` has been received; resumes with its tensors."""

    ticket: Any


Schedule = Generator[Post | Wait, Any, Any]


@dataclass
class CommStats:
    """What a driver moved, per rank: message count and bytes sent, largest single message."""

    messages: int = 0
    bytes_sent: int = 0
    largest_message: int = 0

    def record(self, tensors: tuple[torch.Tensor, ...]) -> None:
        n = sum(t.numel() * t.element_size() for t in tensors)
        self.messages += 1
        self.bytes_sent += n
        self.largest_message = max(self.largest_message, n)


def run_dist(gen: Schedule, group: dist.ProcessGroup) -> Any:
    """Drive one rank's schedule over ``torch.distributed`` point-to-point ops in ``group``."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    send_to = dist.get_global_rank(group, (rank + 1) % world)
    recv_from = dist.get_global_rank(group, (rank - 1) % world)
    value = None
    while True:
        try:
            msg = gen.send(value)
        except StopIteration as stop:
            return stop.value
        # Locals here must not outlive one step: a finished Work still references its tensors,
        # and holding one would keep an extra K/V block alive for the whole step.
        value = _post(msg.tensors, send_to, recv_from, group) if isinstance(msg, Post) else _wait(msg.ticket)
        msg = None


def _post(tensors, send_to, recv_from, group):
    tensors = tuple(t.contiguous() for t in tensors)
    bufs = tuple(torch.empty_like(t) for t in tensors)
    ops = [dist.P2POp(dist.isend, t, send_to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, recv_from, group) for b in bufs]
    return dist.batch_isend_irecv(ops), bufs


def _wait(ticket):
    works, bufs = ticket
    for w in works:
        w.wait()
    return bufs


def run_inprocess(gens: list[Schedule], stats: list[CommStats] | None = None) -> list[Any]:
    """Drive P schedules (index = rank) cooperatively in this process; return their results.

    The k-th post of rank r is received by the k-th post of rank r + 1. Messages are passed by
    reference (no copy); schedules never modify a tensor after posting it.
    """
    world = len(gens)
    mailbox: list[dict[int, tuple]] = [{} for _ in range(world)]
    posted = [0] * world
    resume: list[Any] = [None] * world
    waiting: list[int | None] = [None] * world
    results: list[Any] = [None] * world
    done = [False] * world
    while not all(done):
        progressed = False
        for r in range(world):
            if done[r]:
                continue
            if waiting[r] is not None:
                if waiting[r] not in mailbox[r]:
                    continue
                resume[r] = mailbox[r].pop(waiting[r])
                waiting[r] = None
            while True:  # run rank r until it blocks or finishes
                try:
                    msg = gens[r].send(resume[r])
                except StopIteration as stop:
                    results[r], done[r], progressed = stop.value, True, True
                    break
                progressed = True
                if isinstance(msg, Post):
                    mailbox[(r + 1) % world][posted[r]] = tuple(msg.tensors)
                    if stats is not None:
                        stats[r].record(tuple(msg.tensors))
                    resume[r] = posted[r]
                    posted[r] += 1
                elif msg.ticket in mailbox[r]:
                    resume[r] = mailbox[r].pop(msg.ticket)
                else:
                    waiting[r] = msg.ticket
                    break
        if not progressed:
            raise RuntimeError(f"in-process ring deadlocked: ranks waiting on posts {waiting}")
    return results
