"""A short run of scripts/soak.py (the long one runs in CI, see .ci/run): random kills and stalls
of a CP = 2 training run, automatic resumes, and a loss trajectory equal to an uninterrupted run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_soak_survives_faults_and_matches_the_uninterrupted_run(tmp_path):
    work = tmp_path / "soak"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--faults", "3", "--steps", "20", "--save-every", "2",
         "--timeout", "8", "--seed", "1", "--workdir", str(work)],
        capture_output=True, text=True, timeout=900, cwd=str(ROOT),
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["ok"] and summary["faults"] == 3
    assert summary["interrupted_losses"] == summary["reference_losses"] and len(summary["reference_losses"]) == 20
    rows = (work / "faults.csv").read_text().splitlines()
    assert len(rows) == 4  # header + one row per fault
    # the resumed run's per-step log has each step once, in order (rows of redone steps dropped)
    log = [json.loads(line)["step"] for line in (work / "interrupted" / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 21)), log
    assert (work / "soak.png").is_file()
