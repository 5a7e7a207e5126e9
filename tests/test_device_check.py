"""The GPU plan, rehearsed on CPU: `benchmarks/device_check.sh` is the one prepared run a lent
GPU machine gets (15 minutes a session, machine start included), so a wiring fault found
there costs device time that cannot be had back. Here its harness parts run with
DEVICE=cpu, as `benchmarks/device_prepare.py --rehearsal` describes, on this Python's
packages (no carried wheels, no upstream checkouts: those need GitHub mirrors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"wanda", "sparsegpt", "gptq", "smoothquant", "awq", "omniquant", "llm_pruner"}


def test_device_check_harness_parts_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    none = tmp_path / "no-wheels"  # the machine's own packages, as on the device
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "WHL": str(none), "UPWHL": str(none), "PYTHON": sys.executable,
           "DEADLINE_S": "800"}
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "tests", "roofline", "cost"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    log = (out / "device_check.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "== " in log.splitlines()[-1] and log.splitlines()[-1].endswith("done"), log[-2000:]
    assert "parts: tests roofline cost; device: cpu" in (out / "env.txt").read_text()

    # tests: the gpu-marked tests are collected and each skips with its reason here
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) >= 9 and int(suite.get("skipped")) == int(suite.get("tests")), suite.attrib
    assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    # roofline: on a CPU host, one line that says it needs CUDA, and the run goes on
    assert "roofline: exit" in log and "CUDA" in log
    # cost: every method's engine ran at the tiny shape and was merged into one record
    cost = json.loads((out / "engine_cost.json").read_text())
    assert cost["device_string"] == "cpu" and cost["shape"] == "tiny"
    by_method = {r["method"]: r for r in cost["results"]}
    assert set(by_method) == METHODS
    assert all(r["status"] == "ok" and r["seconds"] > 0 and r["host_peak_rss_bytes"] > 0 for r in by_method.values()), by_method
