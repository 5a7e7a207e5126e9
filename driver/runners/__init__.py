"""Runners execute one job under the volume contract: `local` (a child process), `docker`
(a container per job) and `slurm` (a Slurm job per job, on a cluster).

Every runner has `environment_id(job)` (what enters the job's hash: the package versions and
source digest for local, the image digest for docker) and
`run(job, job_hash, run_dir, model_path, data_dir, on_line)`, which always leaves a result.json.
"""

from __future__ import annotations

import re
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from ..contract import ContractError, ErrorInfo, Job, Provenance, Result, read_record
from ..errors import UserError
from ..fsio import write_record

PACKED_SUFFIX = ".packed"

RUNNERS = ("local", "docker", "slurm")


def check_device_name(device: str) -> bool:
    """Whether an explicit `--device` names CUDA (cpu: False); anything else is a one-line error.
    Whether such a device exists is each runner's question (the host's GPUs, or a partition's)."""
    if device == "cpu":
        return False
    if re.fullmatch(r"cuda(:\d+)?", device):
        return True
    raise UserError(f"unknown device '{device}': use auto, cpu or cuda[:N]")


def with_upstream_interpreter(environment_id: str, job: Job | None, harness: str = sys.executable) -> str:
    """A host runner's identity (local, Slurm without a container) for `job`: an upstream-engine compress
    job adds the interpreter its upstream code runs on where that is not the jobs' own `harness` (an
    image's digest covers its venv already)."""
    if job is None or job.kind != "compress" or job.engine != "upstream":
        return environment_id
    from ...methods._upstream.staging import upstream_interpreter_id

    interpreter = upstream_interpreter_id(harness)
    return environment_id if interpreter is None else f"{environment_id}:upstream[{interpreter}]"


def get_runner(name: str, gpus: str | None = None, cuda_visible: str | None = None, slurm=None, device: str | None = None):
    """`cuda_visible`: the local runner's jobs see only these GPUs (a matrix's worker per GPU).
    `slurm`: the slurm runner's SlurmConfig; `device`: the jobs' device, which its preflight checks
    against the partition."""
    if gpus is not None and name != "docker":
        how = ("a Slurm job whose device is CUDA asks for slurm.gpus_per_job GPUs, set in a matrix file's slurm: "
               "settings (bench, compress and eval ask for 1)"
               if name == "slurm" else "the local runner uses the host's GPUs as they are (set CUDA_VISIBLE_DEVICES to choose)")
        raise UserError(f"--gpus applies to the docker runner (got --runner {name}): {how}")
    if name == "local":
        from .local import LocalRunner

        return LocalRunner(cuda_visible=cuda_visible)
    if name == "docker":
        from .docker import DockerRunner

        return DockerRunner(gpus=gpus)
    if name == "slurm":
        from .slurm import SlurmRunner

        return SlurmRunner(slurm, device)
    raise UserError(f"unknown runner '{name}': choose one of {', '.join(RUNNERS)}")


_STOPPING = threading.Event()  # set by terminate_all: the driver is shutting down, no new job starts


def stopping() -> bool:
    """Whether the driver was interrupted (terminate_all ran): runners start no new job then."""
    return _STOPPING.is_set()


def check_stopping() -> None:
    """Raise KeyboardInterrupt when the driver is shutting down.

    A matrix worker thread does not see the main thread's Ctrl-C: without this check it would
    go on to its next job (or the dense evaluation it was waiting for) after terminate_all."""
    if _STOPPING.is_set():
        raise KeyboardInterrupt


def reset_stopping() -> None:
    """A new run in the same process (a matrix after an interrupted one, tests) may start jobs again."""
    _STOPPING.clear()


def terminate_all() -> None:
    """An interrupted driver leaves nothing running: no new job starts, local job processes are
    killed, containers removed, Slurm jobs cancelled. Their runners report them interrupted
    (KeyboardInterrupt, no result.json), so a resumed matrix runs them again."""
    import sys

    from .local import terminate_children

    _STOPPING.set()
    terminate_children()
    if __name__ + ".docker" in sys.modules:  # only a driver that ran containers has some to remove
        from .docker import remove_containers

        remove_containers()
    if __name__ + ".slurm" in sys.modules:  # only a driver that submitted has Slurm jobs to cancel
        from .slurm import cancel_submitted

        cancel_submitted()


def model_inputs(model_name: str, model_path: Path) -> list[tuple[Path, str]]:
    """What a job sees under `/models`: (host path, name) pairs.

    The model itself as `/models/<name>`; for a compress job's artifact (`<run>/model`) with a
    real low-bit export beside it (`<run>/packed`), that export too, as `/models/<name>.packed`,
    so the evaluation's size measurement (track 4) counts the packed bytes a user would store.
    """
    model_path = Path(model_path).resolve()
    inputs = [(model_path, model_name)]
    packed = model_path.parent / "packed"
    if model_path.name == "model" and packed.is_dir():
        inputs.append((packed, model_name + PACKED_SUFFIX))
    return inputs


def collect_result(run_dir: Path, job_hash: str, started: str, wall_s: float, provenance: Provenance,
                   failure: ErrorInfo | None) -> Result:
    """What a runner leaves once its job process or container is gone.

    `failure` is what the runner itself saw go wrong (a timeout, a kill), or None. Without
    one, the job's own result.json is the result when it wrote a valid one; otherwise (a
    failure, no result, an invalid one) a sealed `failed` result is written in its place, so
    a run dir always ends with a result.json and the log beside it.
    """
    path = run_dir / "result.json"
    if failure is None:
        if path.exists():
            try:
                return read_record(path, Result)
            except ContractError as e:
                failure = ErrorInfo(type="crash", message=f"job wrote an invalid result.json ({e})")
        else:
            failure = ErrorInfo(type="crash", message="the job ended without writing a result")
    result = Result(job_hash=job_hash, status="failed", error=failure, started_at=started,
                    finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), wall_s=wall_s,
                    provenance=provenance).sealed()
    write_record(path, result)
    return result
