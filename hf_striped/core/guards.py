"""Every message hf_striped sends between processes, each with a deadline, and what keeps a
failure loud and bounded. This is the only module that calls ``torch.distributed``'s
communication functions.

* **Deadlines.** A rank that dies mid-ring breaks its TCP/NCCL connections, and its peers fail
  at once; a rank that *stalls* (deadlock elsewhere, a debugger, a swapped-out machine) would
  leave them waiting forever. Every wait therefore has a deadline (``RingOptions.timeout``, see
  :mod:`hf_striped.core.options`) and a failed one raises :class:`RingCommError` naming what it
  waited for: the ring step and peer, or the collective.
* **Agreement** (:func:`agree`). Every cross-rank check (shapes and settings of a ring call,
  positions of a forward, a checkpoint phase, the batches of a CP group, the NaN guard's
  verdict) is one fixed-size all-reduce of a few integers from which every rank reaches the
  same verdict, so a bad input raises on every rank instead of leaving peers waiting.
* **Finite guard** (``check_finite``, off by default, ``HF_STRIPED_CHECK_FINITE=1`` turns it on):
  every block's output and log-sum-exp (and gradient pieces in backward) is checked, and the
  first NaN/Inf raises :class:`NonFiniteError` naming the layer, rank, ring step and training step.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .options import HOW_TO_SET_TIMEOUT, resolve_timeout


class RingCommError(RuntimeError):
    """A ring message or an hf_striped collective did not complete: the peer died (its
    connection broke) or stalled past the timeout. Attributes say where."""

    def __init__(self, message: str, *, phase: str, step: int | None, rank: int, peer: int | None, timed_out: bool):
        super().__init__(message)
        self.phase, self.step, self.rank, self.peer, self.timed_out = phase, step, rank, peer, timed_out


class NonFiniteError(FloatingPointError):
    """A NaN or Inf found by the finite guard. Attributes say where it first appeared."""

    def __init__(self, message: str, *, where: str, rank: int, step: int | None, train_step: int | None):
        super().__init__(message)
        self.where, self.rank, self.step, self.train_step = where, rank, step, train_step


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def host_deadline(group) -> bool:
    """Whether waits on ``group`` get hf_striped's own deadline. On NCCL a ``wait(timeout=)``
    would block the host until the transfer finishes (no more launching ahead of the GPU), so
    there waits stay stream-ordered and the process group's own timeout (NCCL's watchdog,
    ``init_process_group(timeout=)``) bounds them; failures are still named."""
    return not (dist.is_initialized() and dist.get_backend(group) == "nccl")


def wait_all(works, deadline: float, describe, timeout: float, *, phase: str, step: int | None, rank: int,
             peers: list[int | None], bounded: bool = True) -> None:
    """Wait for ``works`` until ``deadline`` (``time.monotonic()``; ignored when not
    ``bounded``); on failure raise :class:`RingCommError` with ``describe(i)`` (what work ``i``
    was doing) in the message."""
    start = time.monotonic()
    for i, work in enumerate(works):
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            ok = work.wait(timeout=timedelta(seconds=remaining)) if bounded else work.wait()
        except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError or DistBackendError
            raise _comm_error(describe(i), exc, time.monotonic() - start, timeout, phase, step, rank,
                              peers[i] if i < len(peers) else None) from exc
        if ok is False:  # some backends report a timeout by returning False
            raise _comm_error(describe(i), TimeoutError("timed out"), time.monotonic() - start, timeout, phase,
                              step, rank, peers[i] if i < len(peers) else None)


def _comm_error(what: str, exc: BaseException, elapsed: float, timeout: float, phase, step, rank, peer) -> RingCommError:
    timed_out = _is_timeout(exc)
    if timed_out:
        why = (f"nothing arrived within the {timeout:g} s timeout, so that rank is stuck (or much slower "
               "than this one): check its log and stack (py-spy dump)")
    else:
        why = (f"the connection failed after {elapsed:.1f} s ({_first_sentence(exc)}), so that process most "
               "likely died: check its log for the first error")
    return RingCommError(f"{what} failed: {why}. {HOW_TO_SET_TIMEOUT}", phase=phase, step=step, rank=rank,
                         peer=peer, timed_out=timed_out)


def _first_sentence(exc: BaseException) -> str:
    """The gist of a backend error: its first sentence, without gloo's source-location prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")[:300]


def collective_device(group=None) -> torch.device:
    """Where tensors for a collective on ``group`` must live: NCCL groups (Accelerate's default on
    GPUs) have no CPU backend, so small bookkeeping collectives run on this rank's GPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group_rank_size(group) -> tuple[int, int]:
    """``(rank, size)`` in ``group`` (``None``: the default group); ``(0, 1)`` without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def wait_work(work, timeout: float | None, what: str, group=None) -> None:
    """Wait for one started collective (``async_op=True``) on ``group`` with a deadline
    (see :func:`host_deadline`); failures raise :class:`RingCommError` naming ``what``."""
    timeout = resolve_timeout(timeout)
    rank = dist.get_rank()
    wait_all([work], time.monotonic() + timeout, lambda _i: f"{what} (global rank {rank})", timeout,
             phase=what, step=None, rank=rank, peers=[None], bounded=host_deadline(group))


def all_reduce(tensor: torch.Tensor, group=None, *, what: str, timeout: float | None = None,
               op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over ``group`` (``None``: every process) with a deadline;
    ``op`` is ``"sum"`` or ``"max"``. Returns ``tensor``; alone, does nothing."""
    if _group_rank_size(group)[1] == 1:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    wait_work(dist.all_reduce(tensor, op=reduce_op, group=group, async_op=True), timeout, what, group)
    return tensor


def all_gather(tensor: torch.Tensor, group=None, *, what: str, timeout: float | None = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape everywhere), in rank order, with a deadline."""
    world = _group_rank_size(group)[1]
    if world == 1:
        return [tensor]
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    wait_work(dist.all_gather(parts, tensor, group=group, async_op=True), timeout, what, group)
    return parts


def reduce_host(values: torch.Tensor, group=None, *, what: str, timeout: float | None = None,
                op: str = "sum") -> torch.Tensor:
    """:func:`all_reduce` of a small bookkeeping tensor: it travels on the group's collective
    device (NCCL has no CPU backend) and comes back on the CPU, ``values`` left untouched."""
    t = values.detach().to(collective_device(group), copy=True)
    return all_reduce(t, group, what=what, timeout=timeout, op=op).cpu()


def barrier(group=None, *, what: str, timeout: float | None = None) -> None:
    """Wait until every rank of ``group`` gets here, with a deadline naming ``what``."""
    reduce_host(torch.zeros(1, dtype=torch.int64), group, what=what, timeout=timeout)


def exchange(tensors: tuple[torch.Tensor, ...], send_to: int, recv_from: int, group) -> tuple[list, tuple]:
    """Post sends of ``tensors`` to global rank ``send_to`` and receives of the same shapes from
    ``recv_from`` (one ``batch_isend_irecv``); returns ``(works, receive buffers)``. The caller
    waits with :func:`wait_all`: posting returns at once, so transfers overlap compute."""
    bufs = tuple(torch.empty_like(t) for t in tensors)
    ops = [dist.P2POp(dist.isend, t, send_to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, recv_from, group) for b in bufs]
    return dist.batch_isend_irecv(ops), bufs


def checksum(*parts: bytes | str) -> int:
    """A 62-bit summary of ``parts`` for an :func:`agree` field, the same on every rank (not
    Python's salted ``hash``) and safe to negate in int64."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
    return int.from_bytes(h.digest(), "little") >> 2


@dataclass(frozen=True)
class Verdict:
    """What :func:`agree` found: the group-wide minimum and maximum of every field."""

    lo: dict[str, int]
    hi: dict[str, int]

    def same(self, name: str) -> bool:
        """Whether every rank gave field ``name`` the same value."""
        return self.lo[name] == self.hi[name]

    def differing(self) -> list[str]:
        """Fields on which the ranks differ, in the order given."""
        return [n for n in self.lo if self.lo[n] != self.hi[n]]


def agree(group, fields: Mapping[str, int], *, what: str, timeout: float | None = None,
          error: BaseException | None = None,
          peer_error: Callable[[int], BaseException] | None = None) -> Verdict:
    """The agreement primitive every cross-rank check uses: one all-reduce (max of each value and
    of its negation) of the integer ``fields`` (the same names on every rank), with a deadline.

    ``error``: this rank's own checks refused its inputs. It is raised here, after the peers
    have heard of it; every other rank raises ``peer_error(rank)`` (default: a ``RuntimeError``
    naming that rank and ``what``), so no rank goes on to wait for one that stopped. When no rank
    failed, returns the :class:`Verdict` (identical on every rank) for the caller to judge.
    ``group=None``: every process. Alone, no message is sent."""
    rank, world = _group_rank_size(group)
    names = list(fields)
    x = torch.tensor([int(fields[n]) for n in names] + [int(error is not None), rank + 1 if error else 0],
                     dtype=torch.int64)
    both = torch.cat([x, -x])
    if world > 1:
        both = reduce_host(both, group, what=what, timeout=timeout, op="max")
    hi, lo = both[: len(x)].tolist(), (-both[len(x):]).tolist()
    if error is not None:
        raise error
    if hi[-2]:
        failed = hi[-1] - 1
        raise (peer_error(failed) if peer_error is not None else RuntimeError(
            f"{what}: rank {failed} failed (its error says why), so this rank stops too instead of waiting for it"))
    return Verdict(lo=dict(zip(names, lo)), hi=dict(zip(names, hi)))


class FiniteGuard:
    """Checks the tensors of one ring attention call for NaN/Inf (see the module docstring).

    A finding is recorded, not raised on the spot: the ring runs on in lockstep (a NaN does not
    change message shapes), and :meth:`settle` then tells every rank of the group, so all of
    them raise :class:`NonFiniteError` together instead of the peers of one rank waiting for it
    until the timeout."""

    def __init__(self, *, rank: int, world_size: int, name: str | None, train_step: int | None):
        self.rank, self.world_size, self.name, self.train_step = rank, world_size, name, train_step
        self.finding: tuple[str, int | None, str, str] | None = None  # (phase, ring step or None, where, message)

    def _where(self, phase: str, step: int | None, source: int | None, rank: int | None = None) -> str:
        rank = self.rank if rank is None else rank
        parts = [self.name or "ring attention", f"CP rank {rank} of {self.world_size}"]
        if rank == self.rank and dist.is_available() and dist.is_initialized():
            parts[-1] += f" (global rank {dist.get_rank()})"
        if step is not None:
            parts.append(f"{phase} ring step {step + 1} of {self.world_size}"
                         + (f" (K/V from CP rank {source})" if source is not None else ""))
        else:
            parts.append(f"{phase} inputs")
        if self.train_step is not None:
            parts.append(f"training step {self.train_step}")
        return ", ".join(parts)

    @staticmethod
    def _bad(name: str, t: torch.Tensor, lse: bool) -> str | None:
        # A log-sum-exp is -inf for rows that saw no key: legitimate. NaN and +inf are not.
        bad = torch.isnan(t) | torch.isposinf(t) if lse else ~torch.isfinite(t)
        if not bool(bad.any()):
            return None
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        return f"{kind} in {int(bad.sum())} of {t.numel()} entries of {name}"

    def inputs(self, phase: str, **tensors: torch.Tensor) -> None:
        """Tensors handed to the ring (q/k/v, or the output gradient): non-finite means upstream."""
        if self.finding is not None:
            return
        for name, t in tensors.items():
            msg = self._bad(name, t, lse=False)
            if msg:
                hint = ("the gradient arriving from the layers above (or the loss) is already non-finite"
                        if phase == "backward" else
                        "the inputs of this attention call are already non-finite, so the problem is upstream "
                        "(earlier layers, the embeddings, the weights after a bad optimizer step: lower the "
                        "learning rate, enable gradient clipping, or use bf16 instead of fp16)")
                where = self._where(phase, None, None)
                self.finding = (phase, None, where, f"hf_striped: {msg} at {where}: {hint}")
                return

    def block(self, phase: str, step: int, source: int, lse: torch.Tensor | None = None, **tensors) -> None:
        """One block's results at ring ``step`` (K/V from CP rank ``source``)."""
        if self.finding is not None:
            return
        found = [m for n, t in tensors.items() if t is not None and (m := self._bad(n, t, lse=False))]
        if lse is not None and (m := self._bad("the block log-sum-exp", lse, lse=True)):
            found.append(m)
        if found:
            where = self._where(phase, step, source)
            self.finding = (phase, step, where, (
                f"hf_striped: {'; '.join(found)} at {where}, with finite inputs: the block "
                "kernel overflowed (fp16 scores beyond 65504? extreme softmax_scale?) or is broken; rerun with "
                "backend='reference' to compare"))

    def raise_if_found(self) -> None:
        if self.finding is not None:
            _phase, step, where, msg = self.finding
            raise NonFiniteError(msg, where=where, rank=self.rank, step=step, train_step=self.train_step)

    def settle(self, phase: str, group, timeout: float | None) -> None:
        """After a ring pass: every rank learns which ranks found a NaN/Inf (one all-reduce of P
        integers), and all raise if any did. Alone (``group`` of one) just raises."""
        if self.world_size == 1 or group is None:
            return self.raise_if_found()
        mine = 0 if self.finding is None else 1 if self.finding[1] is None else self.finding[1] + 2
        verdict = agree(group, {f"rank {r}": mine if r == self.rank else 0 for r in range(self.world_size)},
                        what=f"hf_striped's NaN/Inf check ({self.name or 'ring attention'})", timeout=timeout)
        self.raise_if_found()
        code = [verdict.hi[f"rank {r}"] for r in range(self.world_size)]
        bad = [r for r in range(self.world_size) if code[r]]
        if bad:
            r, c = bad[0], code[bad[0]]
            step = None if c == 1 else c - 2
            where = self._where(phase, step, None, rank=r)
            raise NonFiniteError(
                f"hf_striped: a NaN/Inf was found at {where} (that rank's error has the details); this rank "
                "stops too, instead of waiting for it", where=where, rank=r, step=step, train_step=self.train_step)
