"""The Docker daemon as the driver sees it: connecting (with one-line errors), GPU requests.

Shared by the docker runner, `llmcbench images` and `llmcbench doctor`. Every failure to
reach Docker becomes a `UserError` that says which of the three it is and what to do:
Docker not installed, the daemon down (or not ours to use), or the Python SDK missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .errors import UserError

DEFAULT_SOCKET = "/var/run/docker.sock"


def docker_sdk():
    try:
        import docker
    except ImportError:
        raise UserError("the docker runner needs the Python package 'docker' (the Docker SDK): pip install docker") from None
    return docker


def _socket_path() -> str | None:
    host = os.environ.get("DOCKER_HOST", "")
    if not host:
        return DEFAULT_SOCKET
    if host.startswith("unix://"):
        return host.removeprefix("unix://")
    return None  # tcp:// or ssh://: no local socket to look at


def docker_installed() -> bool:
    """A docker CLI or daemon binary on PATH, or a daemon socket: something of Docker is here."""
    sock = _socket_path()
    return bool(shutil.which("docker") or shutil.which("dockerd") or (sock and Path(sock).exists()))


def connect(timeout_s: int = 30):
    """A connected `docker.DockerClient`, or a one-line UserError naming the problem and the fix."""
    docker = docker_sdk()
    where = os.environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"
    if not docker_installed():
        raise UserError(f"Docker is not installed on this machine (no docker or dockerd command, no daemon at {where}): "
                        "install it (e.g. apt-get install docker.io; images/ci-setup.sh does it) or use --runner local")
    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
    except docker.errors.DockerException as e:
        text = str(e)
        if "Permission denied" in text or "PermissionError" in text:
            raise UserError(f"permission denied on the Docker daemon at {where}: add your user to the 'docker' group "
                            "(then log in again) or run as a user that may use Docker") from None
        raise UserError(f"the Docker daemon is not reachable at {where} ({_short(text)}): start it "
                        "(systemctl start docker, or `dockerd &` as root; images/ci-setup.sh does it) or use --runner local") from None
    return client


def _short(text: str) -> str:
    text = " ".join(text.split())
    for marker in ("No such file or directory", "Connection refused", "Connection aborted", "timed out"):
        if marker in text:
            return marker
    return text[:120]


def nvidia_runtime(info: dict) -> str | None:
    """How this daemon would give a container GPUs, or None.

    `--gpus`/device requests go through the NVIDIA container toolkit's hook; a daemon that
    lists an `nvidia` runtime, or a host with the toolkit's binaries, has it.
    """
    runtimes = info.get("Runtimes") or {}
    if "nvidia" in runtimes:
        return "nvidia runtime registered with the daemon"
    for tool in ("nvidia-container-runtime-hook", "nvidia-container-toolkit", "nvidia-ctk", "nvidia-container-cli"):
        if shutil.which(tool):
            return f"NVIDIA container toolkit ({tool})"
    return None


def host_gpus() -> list[str]:
    """GPU names that `nvidia-smi -L` lists on the host (empty without a driver)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")] if out.returncode == 0 else []


def parse_gpus(spec: str | None) -> str | list[str] | None:
    """`--gpus`: None (decided by the job's device), 'all', or a list of device ids/UUIDs ('0,1')."""
    if spec is None:
        return None
    s = str(spec).strip()
    if s.lower() in {"", "none"}:
        return None
    if s.lower() == "all":
        return "all"
    ids = [x.strip() for x in s.removeprefix("device=").split(",") if x.strip()]
    if not ids or any(not (x.isdigit() or x.startswith(("GPU-", "MIG-"))) for x in ids):
        raise UserError(f"--gpus '{spec}' is not understood: use all, or device indexes/UUIDs such as 0,1")
    return ids


def device_requests(job_device: str, gpus: str | list[str] | None) -> list[dict] | None:
    """The device requests of a container, as the Docker API takes them (`--gpus` semantics).

    A CPU job gets none. A CUDA job gets the GPUs `--gpus` names, or every GPU by default:
    `cuda:N` keeps its meaning only when the container sees the same devices as the host.
    """
    if not job_device.startswith("cuda"):
        return None
    if gpus is None or gpus == "all":
        return [{"Driver": "", "Count": -1, "DeviceIDs": None, "Capabilities": [["gpu"]], "Options": {}}]
    return [{"Driver": "", "Count": 0, "DeviceIDs": list(gpus), "Capabilities": [["gpu"]], "Options": {}}]
