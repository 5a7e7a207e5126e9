"""What the slurm runner submits: the runner config, the batch script and the in-job command.

Pure functions of (config, job, paths), so every runtime's command line is unit-tested
without a cluster: `local` (the driver's own Python environment on the shared filesystem),
`apptainer` (`apptainer exec` of a SIF converted from the method or eval image) and `enroot`
(`srun --container-image` through NVIDIA's pyxis plugin, from a squashfs made by
`enroot import`). docs/slurm.md says how an image becomes a SIF or a squashfs. A job runs in
the image the docker runner would run it in, converted (`image_path`), and its result names
that file and its sha256 (LLMCBENCH_IMAGE, LLMCBENCH_IMAGE_DIGEST, which jobrun records).

Every runtime sees the volume contract exactly as the docker runner's container does:
`/job/job.json`, `/models/<name>`, `/data`, `/out` (the run dir), plus the read-only mounts
that make the inputs' outward symlinks (a hub snapshot's `../../blobs/<sha>`) resolve inside
the container. The local runtime stages the contract paths as symlinks in a node-local
temporary directory, like the local runner (the inputs' own links resolve on the host).
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..contract import Job

RUNTIMES = ("local", "apptainer", "enroot")


def job_args(root: str = "") -> list[str]:
    """jobrun's arguments with the contract paths under `root` ("" in a container, the stage locally)."""
    return ["-m", "llmcbench.driver.jobrun", "--job", f"{root}/job/job.json", "--models", f"{root}/models",
            "--data", f"{root}/data", "--out", f"{root}/out"]


IMAGE_SUFFIX = {"apptainer": ".sif", "enroot": ".sqsh"}


class SlurmConfig(BaseModel):
    """How jobs are submitted: the `slurm:` mapping of a matrix file, or flags. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(default=None, description="default: the cluster's default partition")
    account: str | None = None
    qos: str | None = None
    runtime: Literal["local", "apptainer", "enroot"] = "local"
    image_dir: str | None = Field(default=None, description="apptainer/enroot: folder with method-<name>.sif|.sqsh, "
                                                             "eval.sif|.sqsh and deploy-<backend>[-cpu].sif|.sqsh "
                                                             "(docs/slurm.md)")
    python: str | None = Field(default=None, description="runtime local: the interpreter on the compute nodes "
                                                          "(default: the driver's own, on the shared filesystem)")
    gpus_per_job: int = Field(default=1, ge=1, description="GPUs of a job whose device is CUDA")
    cpus_per_task: int | None = Field(default=None, ge=1)
    mem_gb: float | None = Field(default=None, gt=0)
    time_limit_s: int | None = Field(default=None, gt=0, description="cap on every job's time limit "
                                                                      "(default: the job's own)")
    extra_args: list[str] = Field(default_factory=list, description="more sbatch options, e.g. --constraint=a100")
    poll_s: float = Field(default=2.0, gt=0)
    lost_after_s: float = Field(default=600.0, gt=0, description="a job that neither scontrol nor sacct knows "
                                                                  "for this long is given up (no accounting, and "
                                                                  "the controller forgot it after MinJobAge)")
    max_resubmits: int = Field(default=2, ge=0, description="resubmissions of a preempted job")


def image_path(cfg: SlurmConfig, job: Job) -> Path:
    """The converted image file a job runs in, named as the docker runner's image (images.job_image_name)."""
    from ..images import job_image_name

    return Path(cfg.image_dir or ".") / (job_image_name(job) + IMAGE_SUFFIX[cfg.runtime])


def time_minutes(cfg: SlurmConfig, job: Job) -> int:
    """Slurm counts time limits in whole minutes: the job's limit (capped by the config), rounded up."""
    limit = job.limits.time_limit_s if cfg.time_limit_s is None else min(cfg.time_limit_s, job.limits.time_limit_s)
    return max(1, math.ceil(limit / 60))


def wants_gpu(job: Job) -> bool:
    return job.device.startswith("cuda")


def resource_args(cfg: SlurmConfig, job: Job) -> list[str]:
    """The sbatch options of a job's resource request (also what `sbatch --test-only` checks)."""
    args = [f"--time={time_minutes(cfg, job)}"]
    for flag, value in (("--partition", cfg.partition), ("--account", cfg.account), ("--qos", cfg.qos)):
        if value:
            args.append(f"{flag}={value}")
    if wants_gpu(job):
        args.append(f"--gres=gpu:{cfg.gpus_per_job}")
    if cfg.cpus_per_task:
        args.append(f"--cpus-per-task={cfg.cpus_per_task}")
    mem_bytes = job.limits.memory_bytes
    if cfg.mem_gb:
        args.append(f"--mem={int(cfg.mem_gb * 1024)}M")
    elif mem_bytes:
        args.append(f"--mem={math.ceil(mem_bytes / 2**20)}M")
    return args + list(cfg.extra_args)


def job_command(cfg: SlurmConfig, job: Job, mounts: list[tuple[Path, str, bool]]) -> list[str]:
    """The command the batch script runs for `job`; `mounts` are (host path, contract path, read-only)."""
    if cfg.runtime == "local":  # the stage of symlinks the batch script makes, see batch_script
        return [cfg.python or sys.executable, "-u", *job_args("${stage}")]
    if cfg.runtime == "apptainer":
        cmd = ["apptainer", "exec", "--containall", "--cleanenv", "--no-home", "--pwd", "/"]
        if wants_gpu(job):
            cmd.append("--nv")
        for host, target, ro in mounts:
            cmd += ["--bind", f"{host}:{target}" + (":ro" if ro else "")]
        for key in ("LLMCBENCH_JOB_HASH", "LLMCBENCH_RUNNER", "LLMCBENCH_IMAGE", "LLMCBENCH_IMAGE_DIGEST",
                    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            cmd += ["--env", f"{key}=${{{key}:-}}"]
        return cmd + [str(image_path(cfg, job)), "python", "-u", *job_args()]
    # enroot through pyxis: srun starts the step inside the squashfs image
    binds = ",".join(f"{host}:{target}" + (":ro" if ro else "") for host, target, ro in mounts)
    return ["srun", "--ntasks=1", f"--container-image={image_path(cfg, job)}", f"--container-mounts={binds}",
            "--no-container-mount-home", "--container-workdir=/", "python", "-u", *job_args()]


def contract_mounts(run_dir: Path, inputs: list[tuple[Path, str]], data_dir: Path) -> list[tuple[Path, str, bool]]:
    """The volume contract as (host path, container path, read-only), as the docker runner mounts it."""
    mounts = [(run_dir / "job.json", "/job/job.json", True)]
    mounts += [(host, f"/models/{name}", True) for host, name in inputs]
    return mounts + [(data_dir, "/data", True), (run_dir, "/out", False)]


def link_mounts(inputs: list[tuple[Path, str]], data_dir: Path,
                mounted: list[tuple[Path, str, bool]] = ()) -> list[tuple[Path, str, bool]]:
    """Read-only mounts that make the inputs' symlinks resolve in a container (a hub snapshot's
    `../../blobs/<sha>`): the docker runner's `_symlink_mounts`, for every /models input and /data.
    A host path already in `mounted` keeps its mount there."""
    from .docker import _symlink_mounts  # no Docker SDK: runners/docker.py imports it lazily

    seen = {str(host) for host, _, _ in mounted}
    extra: list[tuple[Path, str, bool]] = []
    for host_dir, container_dir in [*((host, f"/models/{name}") for host, name in inputs), (data_dir, "/data")]:
        for host, target in _symlink_mounts(Path(host_dir), container_dir):
            if host not in seen:
                seen.add(host)
                extra.append((Path(host), target, True))
    return extra


def _quote(arg: str) -> str:
    """Quote for bash, keeping the `${VAR:-}` references of apptainer's --env values live."""
    if "${" in arg:
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'
    return shlex.quote(arg)


def batch_script(cfg: SlurmConfig, job: Job, job_hash: str, run_dir: Path, inputs: list[tuple[Path, str]],
                 data_dir: Path, job_name: str, comment: str, image_digest: str | None = None) -> str:
    """The sbatch script of one contract job. Its output (stdout and stderr) is the run dir's log.txt.

    `image_digest`: apptainer/enroot, the image file's digest (the runner's `image_digest`), which the
    job's result records with the image's path."""
    run_dir = Path(run_dir)
    mounts = contract_mounts(run_dir, inputs, Path(data_dir))
    exports = f"LLMCBENCH_JOB_HASH={job_hash} LLMCBENCH_RUNNER=slurm"
    if cfg.runtime != "local":
        mounts += link_mounts(inputs, Path(data_dir), mounts)
        exports += f" LLMCBENCH_IMAGE={shlex.quote(str(image_path(cfg, job)))}"
        if image_digest:
            exports += f" LLMCBENCH_IMAGE_DIGEST={shlex.quote(image_digest)}"
    directives = [f"--job-name={job_name}", f"--comment={comment}", f"--output={run_dir / 'log.txt'}",
                  "--open-mode=append", "--ntasks=1", "--nodes=1", *resource_args(cfg, job)]
    lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives] + [
        "# written by llmcbench's slurm runner: one contract job (see driver/runners/slurm_script.py)",
        "set -u",
        f"export {exports} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false",
        'echo "[llmcbench] slurm job ${SLURM_JOB_ID:-?} on $(hostname) (restart ${SLURM_RESTART_COUNT:-0})"',
    ]
    command = " ".join(_quote(a) for a in job_command(cfg, job, mounts))
    if cfg.runtime == "local":
        # a node-local stage mirrors the container mounts through symlinks, as the local runner's does
        lines += ['stage=$(mktemp -d "${TMPDIR:-/tmp}/llmcbench-stage-XXXXXX")', "trap 'rm -rf \"$stage\"' EXIT",
                  'mkdir -p "$stage/job" "$stage/models"']
        for host, target, _ in mounts:
            lines.append(f'ln -s {shlex.quote(str(host))} "$stage{target}"')
        lines += [command, "exit $?"]
    else:
        lines.append(f"exec {command}")
    return "\n".join(lines) + "\n"
