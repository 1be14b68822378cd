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

from .guards import exchange, host_deadline, wait_all


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


def run_dist(gen: Schedule, group: dist.ProcessGroup, *, timeout: float, phase: str = "ring",
             name: str | None = None, on_wait=None) -> Any:
    """Drive one rank's schedule over ``torch.distributed`` point-to-point ops in ``group``.

    Every ``Wait`` has a deadline of ``timeout`` seconds (see :mod:`hf_striped.core.guards`); a
    peer that died or stalled raises :class:`~hf_striped.core.guards.RingCommError` naming
    ``phase`` ("forward"/"backward"), the ring step, the message and the peer, instead of waiting
    forever. ``name`` (e.g. "layer 5") is added to that message. ``on_wait(seconds)``, if given,
    is told how long each wait blocked (benchmarks use it).
    """
    route = _Route.of(group, timeout, phase, name)
    value = None
    while True:
        try:
            msg = gen.send(value)
        except StopIteration as stop:
            return stop.value
        # Locals here must not outlive one step: a finished Work still references its tensors,
        # and holding one would keep an extra K/V block alive for the whole step.
        if isinstance(msg, Post):
            tensors = tuple(t.contiguous() for t in msg.tensors)
            works, bufs = exchange(tensors, route.send_to, route.recv_from, group)
            value = _Ticket(works, bufs, len(tensors), msg.what, msg.step)
        else:
            start = time.perf_counter()
            value = _wait(msg.ticket, route)
            if on_wait is not None:
                on_wait(time.perf_counter() - start)
        msg = None


@dataclass(frozen=True)
class _Route:
    """Where this rank's ring messages go and come from, and how waits on them are bounded."""

    rank: int  # in the CP group
    world: int
    send_to: int  # global ranks
    recv_from: int
    where: str  # names the call in errors
    phase: str
    timeout: float
    bounded: bool  # hf_striped's own deadline (False on NCCL: see guards.host_deadline)

    @classmethod
    def of(cls, group, timeout: float, phase: str, name: str | None) -> _Route:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        where = (f"hf_striped ring attention{f' ({name})' if name else ''}, CP rank {rank} of {world} "
                 f"(global rank {dist.get_rank()})")
        return cls(rank, world, dist.get_global_rank(group, (rank + 1) % world),
                   dist.get_global_rank(group, (rank - 1) % world), where, phase, timeout, host_deadline(group))

    @property
    def next_cp(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def prev_cp(self) -> int:
        return (self.rank - 1) % self.world


@dataclass
class _Ticket:
    works: list
    bufs: tuple
    n_send: int
    what: str
    step: int | None


def _wait(ticket: _Ticket, route: _Route):
    works, n, r = ticket.works, ticket.n_send, route
    step = "" if ticket.step is None else f" step {ticket.step + 1} of {r.world}"  # 1-based for people
    head = f"{r.where}, {r.phase}{step}"

    def describe(i: int) -> str:
        if len(works) != 2 * n:  # a backend that coalesces the batch into one work
            return (f"{head}: exchanging {ticket.what} with CP ranks {r.next_cp} (send, global "
                    f"{r.send_to}) and {r.prev_cp} (receive, global {r.recv_from})")
        if i < n:
            return f"{head}: sending {ticket.what} to CP rank {r.next_cp} (global rank {r.send_to})"
        return f"{head}: receiving {ticket.what} from CP rank {r.prev_cp} (global rank {r.recv_from})"

    # (a coalescing backend's single work: name the peer we receive from, the one a hang waits on)
    paired = len(works) == 2 * n
    peers = [r.send_to] * n + [r.recv_from] * n if paired else [r.recv_from] * len(works)
    # Receives first: a dead or stuck peer shows up as the message that never came.
    order = list(range(n, len(works))) + list(range(n)) if paired else list(range(len(works)))
    wait_all([works[i] for i in order], time.monotonic() + r.timeout, lambda j: describe(order[j]), r.timeout,
             phase=r.phase, step=ticket.step, rank=r.rank, peers=[peers[i] for i in order], bounded=r.bounded)
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
