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

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .guards import host_deadline, resolve_timeout, wait_all


@dataclass
class Post:
    """Send ``tensors`` to rank + 1 and receive tensors of the same shapes from rank - 1.
    ``what`` and ``step`` name the message in errors ("K/V", ring step 2)."""

    tensors: tuple[torch.Tensor, ...]
    what: str = "ring message"
    step: int | None = None


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


def run_dist(gen: Schedule, group: dist.ProcessGroup, *, timeout: float | None = None, phase: str = "ring",
             name: str | None = None) -> Any:
    """Drive one rank's schedule over ``torch.distributed`` point-to-point ops in ``group``.

    Every ``Wait`` has a deadline of ``timeout`` seconds (see :mod:`hf_striped.core.guards`); a peer
    that died or stalled raises :class:`~hf_striped.core.guards.RingCommError` naming ``phase``
    ("forward"/"backward"), the ring step, the message and the peer, instead of waiting forever.
    ``name`` (e.g. "layer 5") is added to that message.
    """
    timeout = resolve_timeout(timeout)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    send_to = dist.get_global_rank(group, (rank + 1) % world)
    recv_from = dist.get_global_rank(group, (rank - 1) % world)
    bounded = host_deadline(group)
    where = f"hf_striped ring attention{f' ({name})' if name else ''}, CP rank {rank} of {world} (global rank {dist.get_rank()})"
    value = None
    while True:
        try:
            msg = gen.send(value)
        except StopIteration as stop:
            return stop.value
        # Locals here must not outlive one step: a finished Work still references its tensors,
        # and holding one would keep an extra K/V block alive for the whole step.
        if isinstance(msg, Post):
            value = _Ticket(*_post(msg.tensors, send_to, recv_from, group), msg.what, msg.step)
        else:
            value = _wait(msg.ticket, timeout, where, phase, world, rank, (rank + 1) % world, (rank - 1) % world,
                          send_to, recv_from, bounded)
        msg = None


@dataclass
class _Ticket:
    works: list
    bufs: tuple
    n_send: int
    what: str
    step: int | None


def _post(tensors, send_to, recv_from, group):
    tensors = tuple(t.contiguous() for t in tensors)
    bufs = tuple(torch.empty_like(t) for t in tensors)
    ops = [dist.P2POp(dist.isend, t, send_to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, recv_from, group) for b in bufs]
    return dist.batch_isend_irecv(ops), bufs, len(tensors)


def _wait(ticket: _Ticket, timeout, where, phase, world, rank, next_cp, prev_cp, send_to, recv_from, bounded=True):
    works, n = ticket.works, ticket.n_send
    step = "" if ticket.step is None else f" step {ticket.step + 1} of {world}"  # 1-based for people

    def describe(i: int) -> str:
        if len(works) != 2 * n:  # a backend that coalesces the batch into one work
            return (f"{where}, {phase}{step}: exchanging {ticket.what} with CP ranks {next_cp} (send, global "
                    f"{send_to}) and {prev_cp} (receive, global {recv_from})")
        if i < n:
            return f"{where}, {phase}{step}: sending {ticket.what} to CP rank {next_cp} (global rank {send_to})"
        return f"{where}, {phase}{step}: receiving {ticket.what} from CP rank {prev_cp} (global rank {recv_from})"

    # (a coalescing backend's single work: name the peer we receive from, the one a hang waits on)
    peers = [send_to] * n + [recv_from] * n if len(works) == 2 * n else [recv_from] * len(works)
    # Receives first: a dead or stuck peer shows up as the message that never came.
    order = list(range(n, len(works))) + list(range(min(n, len(works)))) if len(works) == 2 * n else list(range(len(works)))
    wait_all([works[i] for i in order], time.monotonic() + timeout, lambda j: describe(order[j]), timeout,
             phase=phase, step=ticket.step, rank=rank, peers=[peers[i] for i in order], bounded=bounded)
    return ticket.bufs


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
