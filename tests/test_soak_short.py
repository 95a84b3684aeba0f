"""The soak (bench/soak.py) for 36 seconds of traffic (about 50 s in all): no leak, no error, exact ledger."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_a_short_soak_leaks_nothing_and_loses_no_accounting(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", "36", "--rate", "30",
                           "--json", str(out)], capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == [], report["failures"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["requests"] >= 1000 and report["healthy_errors"] == 0
    assert report["by_status"]["200"] >= 900
    assert set(report["by_status"]) <= {"200", "502", "503"}  # 502/503 only for the model without a healthy upstream
    for key in report["ledger"].values():
        assert key["tokens_used"] == key["tokens_served"] > 0 and key["leases_held"] == 0
