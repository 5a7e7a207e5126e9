"""GPU memory in use, sampled from outside torch: SPEC 5's cross-check of track 3's figure.

Track 3's GPU memory is the peak the process reserved through torch's caching allocator (the
reference engines' `max_memory_reserved`, the upstream shim's per timed call). That counts
neither the CUDA context nor memory a library takes past the allocator (cuBLAS workspaces,
an upstream repository's own CUDA kernels). NVML's "memory used" of the device does: this
module samples it while the compression step runs, through `nvidia-smi` (NVML's own
command-line client, which every NVIDIA driver install and every GPU container has), so no
Python binding needs to be in any image.

The figure is device-wide, so on a shared GPU it counts other processes too, and it is a
sample (every `interval_s`), so a spike shorter than that can be missed; the record says so
by its name. Stdlib only: the upstream shim loads this file by path under the upstream
interpreter (methods/_upstream/shim.py), as it does driver/numerics.py.
"""

from __future__ import annotations

import shutil
import subprocess
import threading

QUERY = ["nvidia-smi", "--query-gpu=uuid,memory.used", "--format=csv,noheader,nounits"]
MIB = 1 << 20


def _uuid(value) -> str:
    # nvidia-smi prints "GPU-<uuid>"; torch's device properties give the bare uuid
    text = str(value).strip().lower()
    return text[4:] if text.startswith("gpu-") else text  # (no str.removeprefix: upstream may run Python 3.8)


def used_bytes() -> dict[str, int] | None:
    """Memory used per GPU uuid as NVML reports it now; None where nvidia-smi is missing or fails."""
    if shutil.which(QUERY[0]) is None:
        return None
    try:
        out = subprocess.run(QUERY, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    used = {}
    for line in out.stdout.splitlines():
        uuid, _, mib = line.partition(",")
        try:
            used[_uuid(uuid)] = int(float(mib)) * MIB
        except ValueError:  # "[N/A]" (a MIG parent) or a line of another shape
            continue
    return used


class UsedMemorySampler:
    """While entered, samples the memory NVML reports used on the GPUs `uuids` name (summed)
    every `interval_s`; `peak_bytes` is the largest sum seen, None where nvidia-smi is missing,
    fails, or knows none of those GPUs (no uuids: a CPU job)."""

    def __init__(self, uuids, interval_s: float = 0.2):
        self.uuids = {_uuid(u) for u in uuids if u}
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> bool:
        used = used_bytes()
        if used is None:
            return False
        mine = [used[u] for u in self.uuids if u in used]
        if mine:
            self.samples += 1
            self.peak_bytes = max(self.peak_bytes or 0, sum(mine))
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.sample():
                return

    def __enter__(self) -> "UsedMemorySampler":
        if self.uuids and self.sample():
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=15)
            self.sample()  # what is still held at the end of the step
        return False
