"""Dead and stuck ranks: when one process of a CP group dies (SIGKILL) or stalls (SIGSTOP) in the
middle of the ring, forward or backward, every other rank raises RingCommError within the
timeout, naming the ring step and the peer, and exits by itself. Real gloo process groups of
fresh processes; the fault is injected by the victim into its own ring at a chosen step."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import time

import pytest

from fault_workers import ring_fault_worker

# The ring timeout the survivors run with (seconds): short where a stalled peer must be noticed by
# it; long where a dead one must be noticed *before* it (from the broken connection), so that
# a slow, loaded machine cannot blur the two.
TIMEOUT = {"stall": 4.0, "kill": 20.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fault(tmp_path, world: int, victim: int, phase: str, step: int, how: str, timeout: float):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=ring_fault_worker, args=(r, world, port, victim, phase, step, how, timeout, str(tmp_path)))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    survivors = [r for r in range(world) if r != victim]
    deadline = time.monotonic() + 120 + timeout  # spawn + imports + the fault; generous on 2 busy cores
    try:
        while time.monotonic() < deadline and any(procs[r].is_alive() for r in survivors):
            time.sleep(0.1)
        hung = [r for r in survivors if procs[r].is_alive()]
        victim_state = "exited" if not procs[victim].is_alive() else "alive"
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=10)
    reports = {}
    for r in survivors:
        f = tmp_path / f"rank{r}.json"
        reports[r] = json.loads(f.read_text()) if f.exists() else None
    for r, rep in reports.items():
        print(f"rank {r}: {rep and {k: rep[k] for k in ('raised', 'seconds', 'step', 'peer', 'timed_out')}}")
        print(f"  message: {rep and rep.get('message')}")
    return reports, hung, victim_state, procs


CASES = [
    # world, victim, its phase and ring step (0-based) when it dies/stalls, how, and the phase in
    # which its ring neighbour notices (a rank posts each step's K/V before computing, so a victim
    # that dies at step s of its forward has already sent what its peers' step s + 1 needs).
    (3, 2, "forward", 0, "kill", "forward"),
    (2, 0, "backward", 1, "kill", "backward"),
    (3, 1, "forward", 0, "stall", "forward"),
    (2, 1, "backward", 0, "stall", "backward"),
]


@pytest.mark.parametrize("world,victim,phase,step,how,noticed", CASES,
                         ids=[f"P{c[0]}-{c[4]}-rank{c[1]}-{c[2]}-step{c[3]}" for c in CASES])
def test_survivors_fail_within_the_timeout_naming_step_and_peer(tmp_path, world, victim, phase, step, how, noticed):
    timeout = TIMEOUT[how]
    reports, hung, victim_state, procs = run_fault(tmp_path, world, victim, phase, step, how, timeout)
    assert not hung, f"ranks {hung} were still waiting after {timeout} s timeout + 2 min"
    if how == "stall":
        assert victim_state == "alive"  # it was stopped, never died: only the timeout could end the wait
    for r, rep in reports.items():
        assert rep is not None, f"rank {r} exited without a report (exit code {procs[r].exitcode})"
        assert rep["raised"] == "RingCommError", rep.get("trace")
        msg = rep["message"]
        assert msg.startswith("hf_striped ring attention") and f"{rep['phase']} step {rep['step'] + 1} of {world}" in msg, msg
        assert rep["phase"] in ("forward", "backward")
        assert "CP rank" in msg and "(global rank" in msg
        assert rep["peer"] is not None and rep["peer"] != r
        assert "HF_STRIPED_TIMEOUT" in msg  # says how to change the timeout
        # Bounded: a dead peer breaks the connection at once; a stalled one costs the timeout;
        # a rank further along the ring may wait for a peer that is itself timing out.
        assert rep["seconds"] <= timeout * 2 + 10, rep["seconds"]
        assert procs[r].exitcode == 0  # the process ended by itself after the error
    neighbour = (victim + 1) % world  # receives from the victim: names it, in the expected phase
    nrep = reports[neighbour]
    assert nrep["phase"] == noticed
    if how == "stall":
        assert nrep["timed_out"] and f"within the {timeout:g} s timeout" in nrep["message"]
        assert timeout * 0.9 <= nrep["seconds"] <= timeout * 2 + 10, nrep["seconds"]
    else:
        assert not nrep["timed_out"] and "most likely died" in nrep["message"]
        assert nrep["seconds"] < timeout / 2  # noticed from the broken connection, not the timeout
    assert reports[neighbour]["peer"] == victim
    assert f"CP rank {victim} (global rank {victim})" in reports[neighbour]["message"]
