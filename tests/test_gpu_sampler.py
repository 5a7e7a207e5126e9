"""NVML's memory-used sample beside track 3's allocator peak (driver/gpu_sampler.py).

The figure comes from one `nvidia-smi --loop-ms` process per compression step. Without a GPU, a
stand-in `nvidia-smi` on PATH gives the reader something to read: it answers only the exact
command the sampler runs, in nvidia-smi's CSV shape, for two GPUs (and a MIG parent's `[N/A]`),
one round per interval until it is stopped, and writes its pid so the test can see it is gone.
On a GPU the real one is checked against memory that torch holds (marked `gpu`).
"""

from __future__ import annotations

import os
import time

import pytest

from llmcbench.driver.gpu_sampler import MIB, UsedMemorySampler

STAND_IN = """#!/bin/sh
[ "$*" = "--query-gpu=uuid,memory.used --format=csv,noheader,nounits --loop-ms=50" ] || exit 9
echo $$ > "$SMI_DIR/pid"
n=0
for used in 100 300 200 150 150 150 150 150 150 150 150 150 150 150 150 150 150 150 150 150; do
  n=$((n + 1))
  echo "GPU-aaaa-1111, $used"
  echo "GPU-bbbb-2222, 7"
  echo "GPU-cccc-3333, [N/A]"
  echo $n > "$SMI_DIR/rounds"
  sleep 0.05
done
exec sleep 60
"""


@pytest.fixture
def smi_dir(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(STAND_IN)
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SMI_DIR", str(tmp_path))
    return tmp_path


def _wait_for_rounds(smi_dir, n: int, limit_s: float = 20) -> None:
    """Until the running stand-in has printed `n` rounds (each sampler's starts from none)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if (smi_dir / "rounds").is_file() and int((smi_dir / "rounds").read_text() or 0) >= n:
            return  # its lines are in the pipe: the reader drains them before it sees the end
        time.sleep(0.02)
    raise AssertionError(f"the stand-in nvidia-smi printed fewer than {n} rounds in {limit_s} s")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_the_peak_is_the_largest_sample_of_the_gpu_and_nvidia_smi_stops_with_the_step(smi_dir):
    """The GPU is found by torch's bare uuid or nvidia-smi's `GPU-` one; the peak is its largest
    sample, not the last; leaving the step stops nvidia-smi, which would otherwise print on."""
    (smi_dir / "rounds").unlink(missing_ok=True)
    with UsedMemorySampler("AAAA-1111", interval_ms=50) as nvml:
        _wait_for_rounds(smi_dir, 4)
    pid = int((smi_dir / "pid").read_text())
    assert nvml.peak_bytes == 300 * MIB and nvml.samples >= 4
    assert _gone(pid)
    (smi_dir / "rounds").unlink()
    with UsedMemorySampler("GPU-bbbb-2222", interval_ms=50) as other:
        _wait_for_rounds(smi_dir, 2)
    assert other.peak_bytes == 7 * MIB


def test_no_figure_without_a_gpu_it_knows(smi_dir, tmp_path, monkeypatch):
    """A CPU job (no uuid), a GPU nvidia-smi does not list, one without a figure (`[N/A]`), a failing
    nvidia-smi, or none at all: no figure, rather than a wrong one, and the step goes on."""
    with UsedMemorySampler(None) as cpu:
        pass
    assert cpu.peak_bytes is None and cpu._proc is None  # nothing started for a CPU job
    for uuid in ("dddd-4444", "cccc-3333"):
        (smi_dir / "rounds").unlink(missing_ok=True)
        with UsedMemorySampler(uuid, interval_ms=50) as nvml:
            _wait_for_rounds(smi_dir, 2)
        assert nvml.peak_bytes is None and nvml.samples == 0, uuid
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")
    with UsedMemorySampler("aaaa-1111", interval_ms=50) as failing:
        time.sleep(0.2)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with UsedMemorySampler("aaaa-1111") as missing:
        pass
    assert failing.peak_bytes is None and missing.peak_bytes is None and missing._proc is None


def test_no_thread_to_spare_is_no_figure_and_no_nvidia_smi_left(smi_dir, monkeypatch):
    """Where no thread can be started (a container's pids limit), the step goes on without a figure
    and the nvidia-smi already started does not outlive it."""
    import threading

    def refuse(self):
        raise RuntimeError("can't start new thread")

    (smi_dir / "rounds").unlink(missing_ok=True)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    with UsedMemorySampler("aaaa-1111", interval_ms=50) as nvml:
        time.sleep(0.5)
    monkeypatch.undo()
    assert nvml.peak_bytes is None and nvml._proc is None
    # killed: it prints no more rounds (left running, it prints one every 50 ms)
    rounds = (smi_dir / "rounds").read_text() if (smi_dir / "rounds").exists() else None
    time.sleep(0.3)
    assert ((smi_dir / "rounds").read_text() if (smi_dir / "rounds").exists() else None) == rounds


@pytest.mark.gpu
def test_nvml_sees_the_memory_torch_holds():
    """On a GPU: while 1 GiB is held, NVML's used memory of the device (the real nvidia-smi) is at
    least that and what torch reserved (NVML also counts the CUDA context)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    held = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    with UsedMemorySampler(str(props.uuid), interval_ms=100) as nvml:
        time.sleep(1.0)
    assert nvml.samples >= 3, "nvidia-smi did not answer for this GPU"
    assert nvml.peak_bytes >= max(held.numel(), torch.cuda.memory_reserved(0)), (nvml.peak_bytes, torch.cuda.memory_reserved(0))
