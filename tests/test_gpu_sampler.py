"""NVML's memory-used sample beside track 3's allocator peak (driver/gpu_sampler.py).

The figure comes from `nvidia-smi`. Without a GPU, a stand-in `nvidia-smi` on PATH gives the
parsing and the sampling thread something to read: it answers only the exact query the sampler
sends, in nvidia-smi's CSV shape, for two GPUs (and a MIG parent's `[N/A]`). On a GPU the real
one is checked against memory that torch holds (marked `gpu`).
"""

from __future__ import annotations

import os
import time

import pytest

from llmcbench.driver.gpu_sampler import MIB, UsedMemorySampler

STAND_IN = """#!/bin/sh
[ "$*" = "--query-gpu=uuid,memory.used --format=csv,noheader,nounits" ] || exit 9
n=$(cat "$COUNTER" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "$COUNTER"
echo "GPU-aaaa-1111, $((n * 100))"
echo "GPU-bbbb-2222, 7"
echo "GPU-cccc-3333, [N/A]"
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(STAND_IN)
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("COUNTER", str(tmp_path / "counter"))
    return tmp_path / "counter"


def test_the_peak_is_the_largest_sample_of_the_named_gpus(stand_in):
    """Sampled while entered (a sample at entry, one every interval, one at exit): the peak is the
    largest sum over the GPUs named, by torch's bare uuid or nvidia-smi's `GPU-` one."""
    with UsedMemorySampler(["aaaa-1111", "GPU-BBBB-2222"], interval_s=0.05) as nvml:
        time.sleep(0.5)
    calls = int(stand_in.read_text())
    assert nvml.samples == calls >= 4
    assert nvml.peak_bytes == (calls * 100 + 7) * MIB  # the last sample is the largest: the first GPU's use grows
    with UsedMemorySampler(["bbbb-2222"], interval_s=0.05) as one:
        time.sleep(0.2)
    assert one.peak_bytes == 7 * MIB


def test_no_figure_without_a_gpu_it_knows(stand_in, tmp_path, monkeypatch):
    """A CPU job (no uuids), a GPU nvidia-smi does not list, one without a figure (`[N/A]`), a failing
    nvidia-smi or none at all: no figure, rather than a wrong one."""
    for uuids in ([], ["dddd-4444"], ["cccc-3333"]):
        with UsedMemorySampler(uuids, interval_s=0.05) as nvml:
            time.sleep(0.1)
        assert nvml.peak_bytes is None and nvml.samples == 0, uuids
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")
    with UsedMemorySampler(["aaaa-1111"]) as failing:
        pass
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with UsedMemorySampler(["aaaa-1111"]) as missing:
        pass
    for nvml in (failing, missing):
        assert nvml.peak_bytes is None and nvml._thread is None


@pytest.mark.gpu
def test_nvml_sees_the_memory_torch_holds():
    """On a GPU: while 1 GiB is held, NVML's used memory of the device (the real nvidia-smi) is at
    least that and what torch reserved (NVML also counts the CUDA context)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    held = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    with UsedMemorySampler([str(props.uuid)], interval_s=0.1) as nvml:
        time.sleep(1.0)
    assert nvml.samples >= 3, "nvidia-smi did not answer for this GPU"
    assert nvml.peak_bytes >= max(held.numel(), torch.cuda.memory_reserved(0)), (nvml.peak_bytes, torch.cuda.memory_reserved(0))
