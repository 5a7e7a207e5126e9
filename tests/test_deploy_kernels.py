"""benchmarks/deploy_kernels.py runs every torch_native linear kernel it names, on CPU.

A smoke test of the benchmark's wiring on one small shape: each kernel is called and timed
(the figures belong to the benchmark, not to this test), and an fp32 model also gets the
kernels' exact fp32 paths, the comparison that made them compute in bf16.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_every_kernel_is_timed_on_one_shape(tmp_path):
    import deploy_kernels

    out = tmp_path / "kernels.json"
    assert deploy_kernels.main(["--shapes", "256x128", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    [row] = figures["rows"]
    assert (row["in"], row["out"]) == (256, 128) and figures["dtype"] == "torch.float32"
    assert set(row["us"]) == {"dense", "dense bf16", "int8 w/o", "int4 w/o", "int8 w/o exact", "int4 w/o exact", "int8 dyn"}
    assert all(v > 0 for v in row["us"].values()), row
