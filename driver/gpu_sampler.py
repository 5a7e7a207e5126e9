"""GPU memory in use, sampled from outside torch: SPEC 5's cross-check of track 3's figure.

Track 3's GPU memory is the peak the process reserved through torch's caching allocator
(`max_memory_reserved`). That counts neither the CUDA context nor memory a library takes past
the allocator (cuBLAS workspaces, custom CUDA kernels). NVML's "memory used" of the device
does: `UsedMemorySampler` reads it while the reference engine's compression step runs, from
one `nvidia-smi ... -lms N` process (NVML's own command-line client, which every NVIDIA driver
install and GPU container has, so no Python binding is needed) that prints the device's figure
every N ms until it is stopped. One process per step, read by a daemon thread: no process is
started per sample, and a hung nvidia-smi (a GPU in trouble) cannot hold the step, whose exit
waits for it a bounded time.

The figure is device-wide, so on a shared GPU it counts other processes too, and it is a sample,
so a spike shorter than the interval can be missed; its record name says NVML. The upstream
engine has none: its pinned stacks' torch (2.1 to 2.3) gives no device uuid to find the GPU by
in nvidia-smi's list.
"""

from __future__ import annotations

import shutil
import subprocess
import threading

MIB = 1 << 20
STOP_WAIT_S = 3.0


def _uuid(value) -> str:
    # nvidia-smi prints "GPU-<uuid>"; torch's device properties give the bare uuid
    text = str(value).strip().lower()
    return text[4:] if text.startswith("gpu-") else text


class UsedMemorySampler:
    """While entered, the largest memory NVML reports used on the GPU `uuid` names, sampled
    every `interval_ms` (`peak_bytes`); None where there is no uuid (a CPU job), no nvidia-smi,
    nvidia-smi does not list that GPU (a MIG instance: only its parent is listed), or the step
    ended before nvidia-smi's first round."""

    def __init__(self, uuid: str | None, interval_ms: int = 200):
        self.uuid = _uuid(uuid) if uuid else None
        self.interval_ms = interval_ms
        self.peak_bytes: int | None = None
        self.samples = 0
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def _read(self) -> None:
        try:
            for line in self._proc.stdout:
                uuid, _, mib = line.partition(",")
                if _uuid(uuid) != self.uuid:
                    continue
                try:
                    used = int(float(mib)) * MIB
                except (ValueError, OverflowError):  # "[N/A]"
                    continue
                self.samples += 1
                self.peak_bytes = max(self.peak_bytes or 0, used)
        except Exception:  # noqa: BLE001 - a cross-check never fails the step it watches
            pass

    def __enter__(self) -> "UsedMemorySampler":
        smi = shutil.which("nvidia-smi") if self.uuid else None
        if smi is None:
            return self
        try:
            self._proc = subprocess.Popen([smi, "--query-gpu=uuid,memory.used", "--format=csv,noheader,nounits",
                                           f"--loop-ms={self.interval_ms}"], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace")
            self._thread = threading.Thread(target=self._read, name="nvml-sampler", daemon=True)
            self._thread.start()
        except Exception:  # noqa: BLE001 - no process or thread to spare (a pids limit): no figure, the step goes on
            if self._proc is not None:
                self._proc.kill()
            self._proc = self._thread = None
        return self

    def __exit__(self, *exc) -> bool:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()  # not waited for again: one stuck in the driver is not this step's to wait on
            if self._thread is not None:
                self._thread.join(timeout=STOP_WAIT_S)
        return False
