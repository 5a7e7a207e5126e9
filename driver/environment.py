"""What ran a job: library versions, CUDA, GPU; and the identity that enters job hashes."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

from .contract import Environment

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_SOURCE_DIRS = ("driver", "methods", "tracks")
_SOURCE_SUFFIXES = {".py", ".toml", ".yaml", ".yml", ".jsonl", ".json", ".csv"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect_environment() -> Environment:
    """Called inside the job process, after torch is imported anyway."""
    import torch

    cuda = torch.version.cuda if torch.cuda.is_available() else None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=_version("transformers"),
        lm_eval=_version("lm_eval"),
        cuda=cuda,
        gpu_name=gpu,
        driver=_nvidia_driver(),
        platform=f"{platform.system()} {platform.machine()}",
        llmcbench=_version("llmcbench"),
    )


def _nvidia_driver(path: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    return parse_driver_version(lines[0]) if lines else None


def parse_driver_version(line: str) -> str | None:
    """The version number in the kernel module's line, wherever it stands: the proprietary module
    writes "... x86_64 Kernel Module  535.104.05  Sat Aug ..." and the open one "... Open Kernel
    Module for x86_64  580.159.04  Release Build ..." (a lent H200 recorded "for" when this was
    read by position)."""
    match = re.search(r"(?<![\w.])(\d+\.\d+(?:\.\d+)*)(?![\w.])", line)
    return match.group(1) if match else (line.strip() or None)


def source_digest() -> str:
    """sha256 over the harness's own code and data (driver, methods, tracks).

    It enters the local runner's identity so that a changed engine, task or scorer never
    serves a stale cached result; the docker runner uses the image digest instead.
    """
    h = hashlib.sha256()
    roots = [(PROJECT_ROOT / d, d) for d in _SOURCE_DIRS]
    # method folders outside the package (LLMCBENCH_METHODS_PATH): an edited out-of-tree engine
    # was a cache hit on the results of its old code
    roots += [(Path(d), f"methods-path-{i}") for i, d in enumerate(os.environ.get("LLMCBENCH_METHODS_PATH", "").split(os.pathsep)) if d]
    for root, name in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in _SOURCE_SUFFIXES and "__pycache__" not in p.parts and not p.name.startswith("test_"):
                h.update(f"{name}/{p.relative_to(root).as_posix()}".encode())
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def local_environment_id() -> str:
    libs = ",".join(f"{d}={_version(d)}" for d in ("torch", "transformers", "lm_eval", "accelerate"))
    return f"local:py{sys.version_info.major}.{sys.version_info.minor}:{libs}:src={source_digest()[:16]}"
