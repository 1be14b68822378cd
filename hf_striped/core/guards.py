"""What keeps a failure loud and bounded: timeouts on every ring wait, errors that say where the
ring stopped, a cross-rank agreement check, and the optional NaN/Inf guard.

* **Timeouts.** A rank that dies mid-ring breaks its TCP/NCCL connections, and its peers fail at
  once; a rank that *stalls* (deadlock elsewhere, a debugger, a swapped-out machine) would leave
  them waiting forever. Every wait of the ring and of hf_striped's own collectives therefore has a
  deadline: ``timeout`` seconds (``context_parallel(..., timeout=)``, ``ContextParallel(timeout=)``,
  ``ring_attention(timeout=)``, ``scripts/train.py --timeout``), by default the environment
  variable ``HF_STRIPED_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`. It bounds how long one rank waits
  for one message, so it must exceed the longest legitimate skew between ranks at a ring step
  (one block's compute, plus whatever a rank does between two forwards that its peers do not).
* **Agreement.** Ranks that call the ring with different shapes would send messages of different
  sizes and hang or corrupt memory; one tiny all-reduce per call compares them first, and every
  rank raises the same error.
* **Finite guard** (``check_finite``, off by default, ``HF_STRIPED_CHECK_FINITE=1`` turns it on):
  every block's output and log-sum-exp (and gradient pieces in backward) is checked, and the
  first NaN/Inf raises :class:`NonFiniteError` naming the layer, rank, ring step and training step.
"""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta

import torch
import torch.distributed as dist

ENV_TIMEOUT = "HF_STRIPED_TIMEOUT"
ENV_CHECK_FINITE = "HF_STRIPED_CHECK_FINITE"
DEFAULT_TIMEOUT_S = 600.0
"""Default deadline for one ring wait, in seconds (NCCL's own default collective timeout)."""

_HOW_TO_SET = (
    f"Set the timeout with context_parallel(..., timeout=), ContextParallel(timeout=), ring_attention(timeout=), "
    f"scripts/train.py --timeout, or the {ENV_TIMEOUT} environment variable (default {DEFAULT_TIMEOUT_S:g} s)."
)


def resolve_timeout(timeout: float | None) -> float:
    """``timeout`` in seconds, or the ``HF_STRIPED_TIMEOUT`` environment variable, or the default."""
    source = "timeout"
    if timeout is None:
        raw = os.environ.get(ENV_TIMEOUT)
        if raw is None:
            return DEFAULT_TIMEOUT_S
        source = ENV_TIMEOUT
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds; set e.g. {ENV_TIMEOUT}=600") from None
    if not timeout > 0 or timeout != timeout or timeout == float("inf"):
        raise ValueError(f"{source} must be a positive, finite number of seconds; got {timeout!r}")
    return float(timeout)


def resolve_check_finite(flag: bool | None) -> bool:
    """``flag``, or whether ``HF_STRIPED_CHECK_FINITE`` is set to 1/true/yes/on."""
    if flag is not None:
        return bool(flag)
    raw = os.environ.get(ENV_CHECK_FINITE, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV_CHECK_FINITE}={os.environ[ENV_CHECK_FINITE]!r}: set it to 1 (on) or 0 (off)")


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
    return RingCommError(f"{what} failed: {why}. {_HOW_TO_SET}", phase=phase, step=step, rank=rank,
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


def collective(fn, tensor: torch.Tensor, group, timeout: float | None, what: str, **kwargs) -> None:
    """Run the collective ``fn(tensor, group=group, async_op=True, **kwargs)`` with a deadline;
    failures raise :class:`RingCommError` naming ``what``."""
    wait_work(fn(tensor, group=group, async_op=True, **kwargs), timeout, what, group)


def wait_work(work, timeout: float | None, what: str, group=None) -> None:
    """Wait for one started collective (``async_op=True``) on ``group`` with a deadline
    (see :func:`host_deadline`); failures raise :class:`RingCommError` naming ``what``."""
    timeout = resolve_timeout(timeout)
    rank = dist.get_rank()
    wait_all([work], time.monotonic() + timeout, lambda _i: f"{what} (global rank {rank})", timeout,
             phase=what, step=None, rank=rank, peers=[None], bounded=host_deadline(group))


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
        code = torch.zeros(self.world_size, dtype=torch.int64)
        if self.finding is not None:
            code[self.rank] = 1 if self.finding[1] is None else self.finding[1] + 2
        code = code.to(collective_device(group))
        collective(dist.all_reduce, code, group, timeout, f"hf_striped's NaN/Inf check ({self.name or 'ring attention'})",
                   op=dist.ReduceOp.MAX)
        code = code.cpu()
        self.raise_if_found()
        bad = [r for r in range(self.world_size) if int(code[r])]
        if bad:
            r, c = bad[0], int(code[bad[0]])
            step = None if c == 1 else c - 2
            where = self._where(phase, step, None, rank=r)
            raise NonFiniteError(
                f"hf_striped: a NaN/Inf was found at {where} (that rank's error has the details); this rank "
                "stops too, instead of waiting for it", where=where, rank=r, step=step, train_step=self.train_step)
