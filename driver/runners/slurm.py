"""The slurm runner: each contract job is one Slurm job; Slurm does the scheduling.

Why sbatch by hand and not submitit: submitit's unit is a pickled Python callable run by the
same interpreter (with submitit importable) inside the job; ours is a command under the
volume contract that must also run inside Apptainer or enroot images that carry only this
project. What is left to do by hand is small: render a batch script
(runners/slurm_script.py), `sbatch --parsable`, poll the job, map its end state, `scancel`.

- Before anything is submitted (`preflight`): `sbatch` on the PATH, the partition exists, a
  CUDA job's partition has GPUs, and `sbatch --test-only` accepts the resource request;
  each problem is one line.
- A job's stdout and stderr go to the run dir's `log.txt` on the shared filesystem; the
  driver tails it while it polls `scontrol show job` (`sacct` once the controller has
  forgotten the job), so progress shows as with the other runners.
- End states map to the contract's error classes (`SLURM_ERRORS`); PREEMPTED is resubmitted
  up to `max_resubmits` times. A failed job's own result.json (e.g. an `oom` its engine
  caught) wins over the state, as with the other runners.
- Every job carries the store in its `--comment`, so `llmcbench cancel` (and Ctrl-C, through
  `cancel_submitted`) cancels exactly what this store submitted.
- The job hash's environment identity: the local environment for the `local` runtime (the
  same job as the local runner's, so the two share the cache; with `slurm.python`, that
  interpreter's own versions, asked once), the image file's sha256 for apptainer/enroot,
  which the job's result also records (provenance.image, provenance.image_digest).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Callable

from ..contract import ErrorInfo, Job, Provenance, Result
from ..errors import UserError
from ..fsio import sha256_file, write_atomic
from . import check_device_name, check_stopping, collect_result, model_inputs, with_upstream_interpreter
from .slurm_script import SlurmConfig, batch_script, image_path, resource_args, time_minutes

# Slurm end state -> the contract's error class (COMPLETED and FAILED read the job's own result)
SLURM_ERRORS = {
    "OUT_OF_MEMORY": "oom",
    "TIMEOUT": "timeout",
    "DEADLINE": "timeout",
    "CANCELLED": "cancelled",
    "NODE_FAIL": "node_fail",
    "BOOT_FAIL": "node_fail",
    "PREEMPTED": "preempted",
    "REVOKED": "cancelled",
}
FINISHED = {"COMPLETED", "FAILED", *SLURM_ERRORS}
COMMENT_PREFIX = "llmcbench:"
SUBMISSIONS_FILE = "slurm.json"

_SUBMITTED: dict[str, str] = {}  # Slurm job id -> run dir, of jobs this driver is waiting for
_SUBMITTED_LOCK = threading.Lock()


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UserError(f"'{cmd[0]}' is not on the PATH: the slurm runner needs Slurm's client commands "
                        "(run on a login node of the cluster, or install slurm-client)") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"'{' '.join(cmd[:2])}' did not answer in {timeout:.0f} s: is the Slurm controller up "
                        "(scontrol ping)?") from None


def _first_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return re.sub(r"^s\w+: error: ", "", (errors or lines or [f"exit code {proc.returncode}"])[0])


def store_comment(runs_dir: Path) -> str:
    return COMMENT_PREFIX + str(Path(runs_dir).resolve())


def scancel_and_wait(ids: list[str], timeout_s: float = 30) -> None:
    """scancel the jobs and wait (bounded) until Slurm no longer lists them.

    Why wait: after `scancel` a job stays in the queue as COMPLETING until its processes are
    killed; a driver that exits at once would leave it there, and a re-run that starts at once
    would find the node still busy.
    """
    if not ids or not shutil.which("scancel"):
        return
    subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            proc = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-t", "PD,CF,R,S,CG", "-o", "%i"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return
        if proc.returncode != 0 or not proc.stdout.strip():  # an id Slurm has forgotten is an error: gone
            return
        time.sleep(0.5)


def cancel_submitted() -> list[str]:
    """scancel every job this driver is still waiting for (Ctrl-C, SIGTERM of a matrix)."""
    with _SUBMITTED_LOCK:
        ids = list(_SUBMITTED)
    scancel_and_wait(ids)
    return ids


def cancel_store(runs_dir: Path) -> list[str]:
    """scancel every queued or running job whose comment names this store (`llmcbench cancel`)."""
    if not shutil.which("squeue"):
        raise UserError("'squeue' is not on the PATH: there is no Slurm here to cancel jobs in")
    proc = _run(["squeue", "-h", "--me", "-o", "%i|%k"])
    if proc.returncode != 0:
        raise UserError(f"squeue failed: {_first_error(proc)}")
    want = store_comment(runs_dir)
    ids = [i for i, _, c in (ln.partition("|") for ln in proc.stdout.splitlines()) if c.strip() == want]
    if ids:
        _run(["scancel", *ids])
    return ids


def job_state(job_id: str) -> tuple[str, str]:
    """(state, exit code) of a job: `scontrol` while the controller knows it, then `sacct`."""
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    if proc.returncode == 0 and "JobState=" in proc.stdout:
        fields = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
        return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "")
    proc = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"])
    line = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
    if line:
        state, _, code = line.partition("|")
        return state.split()[0], code  # "CANCELLED by 0" -> CANCELLED
    return "UNKNOWN", ""


@lru_cache(maxsize=None)
def _partitions() -> tuple[dict[str, str], str | None]:
    """{partition: its nodes' GRES} and the default partition, from sinfo."""
    proc = _run(["sinfo", "-h", "-o", "%P|%G"])
    if proc.returncode != 0:
        raise UserError(f"the Slurm cluster does not answer (sinfo: {_first_error(proc)})")
    parts: dict[str, str] = {}
    default = None
    for line in proc.stdout.splitlines():
        name, _, gres = line.strip().partition("|")
        if name.endswith("*"):
            name = name[:-1]
            default = name
        parts[name] = (parts.get(name, "") + "," + gres).strip(",")
    return parts, default


def preflight(cfg: SlurmConfig, device: str | None = None) -> None:
    """Refuse, before anything is submitted, what Slurm would refuse or could never run."""
    if shutil.which("sbatch") is None:
        raise UserError("no 'sbatch' on the PATH: the slurm runner submits through Slurm (run on a login node of the "
                        "cluster, or use --runner local)")
    parts, default = _partitions()
    partition = cfg.partition or default
    if partition is None:
        raise UserError("the Slurm cluster has no default partition: set slurm.partition (sinfo lists them)")
    if partition not in parts:
        raise UserError(f"Slurm partition '{partition}' does not exist (partitions: {', '.join(sorted(parts)) or 'none'})")
    if device and device.startswith("cuda") and "gpu" not in parts[partition]:
        raise UserError(f"the jobs ask for GPUs (device {device}) but Slurm partition '{partition}' has none "
                        f"(its nodes' GRES: {parts[partition] or '(null)'}): choose a GPU partition or --device cpu")
    if cfg.runtime != "local" and not cfg.image_dir:
        raise UserError(f"slurm runtime {cfg.runtime} needs slurm.image_dir, the folder of converted images "
                        "(docs/slurm.md)")
    _test_only(cfg.model_dump_json(), device or "cpu")


@lru_cache(maxsize=None)
def _test_only(cfg_json: str, device: str) -> None:
    """`sbatch --test-only` with a job's full resource request: Slurm's own validation, nothing queued."""
    cfg = SlurmConfig.model_validate_json(cfg_json)
    probe = Job.model_validate({"kind": "eval", "method": "dense", "model": {"name": "m", "source": "local", "identity": "x"},
                                "device": device})
    proc = _run(["sbatch", "--test-only", *resource_args(cfg, probe), "--wrap", "true"])
    if proc.returncode != 0:
        raise UserError(f"Slurm refuses the jobs' resource request ({' '.join(resource_args(cfg, probe))}): "
                        f"{_first_error(proc)}")


class SlurmRunner:
    name = "slurm"

    def __init__(self, config: SlurmConfig | None = None, device: str | None = None):
        self.config = config or SlurmConfig()
        preflight(self.config, device)

    def resolve_device(self, device: str) -> str:
        """`auto` on a cluster: CUDA when the partition has GPUs (the login node's own GPUs do not count)."""
        if device != "auto":
            check_device_name(device)
            return device
        parts, default = _partitions()
        return "cuda" if "gpu" in parts.get(self.config.partition or default or "", "") else "cpu"

    def environment_id(self, job: Job | None = None) -> str:
        if self.config.runtime == "local":
            if self.config.python and self.config.python != sys.executable:
                return with_upstream_interpreter(_python_environment_id(self.config.python), job, self.config.python)
            from ..environment import local_environment_id

            return with_upstream_interpreter(local_environment_id(), job)
        return f"{self.config.runtime}:{self.image_digest(job).removeprefix('sha256:')[:16]}"

    def image_digest(self, job: Job) -> str:
        """apptainer/enroot: the sha256 of the image file that runs `job` (its prefix is the environment id)."""
        path = image_path(self.config, job)
        if not path.is_file():
            raise UserError(f"image {path} does not exist: convert the {path.stem} image for {self.config.runtime} "
                            "(docs/slurm.md)")
        st = path.stat()
        return "sha256:" + _file_digest(str(path), st.st_size, st.st_mtime_ns)

    # ------------------------------------------------------------------ one job

    def run(self, job: Job, job_hash: str, run_dir: Path, model_path: Path, data_dir: Path,
            on_line: Callable[[str], None] | None = None) -> Result:
        run_dir = Path(run_dir).resolve()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        container = self.config.runtime != "local"
        provenance = Provenance(runner=self.name, image=str(image_path(self.config, job)) if container else None,
                                image_digest=self.image_digest(job) if container else None)
        script = batch_script(self.config, job, job_hash, run_dir, model_inputs(job.model.name, model_path),
                              Path(data_dir).resolve(), f"llmcb-{job.kind}-{job.method}-{job_hash[:10]}",
                              store_comment(run_dir.parent.parent), image_digest=provenance.image_digest)
        write_atomic(run_dir / "slurm.sh", script)
        attempts: list[dict] = []
        failure: ErrorInfo | None = None
        tail = _LogTail(run_dir / "log.txt", on_line)
        while True:
            check_stopping()  # an interrupted matrix resubmits nothing
            job_id = self._submit(run_dir)
            attempts.append({"job_id": job_id, "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            self._record(run_dir, attempts)
            try:
                state, exit_code = self._wait(job_id, tail)
            except BaseException:  # Ctrl-C, SIGTERM: what this driver submitted does not outlive it
                scancel_and_wait([job_id])
                attempts[-1]["state"] = "CANCELLED (driver interrupted)"
                self._record(run_dir, attempts)
                raise
            finally:
                with _SUBMITTED_LOCK:
                    _SUBMITTED.pop(job_id, None)
            attempts[-1].update(state=state, exit_code=exit_code)
            self._record(run_dir, attempts)
            tail.poll()
            if state == "PREEMPTED" and len(attempts) <= self.config.max_resubmits:
                tail.emit(f"[llmcbench] slurm job {job_id} was preempted: resubmitting "
                          f"({len(attempts)}/{self.config.max_resubmits})")
                continue
            failure = self._failure(job_id, state, exit_code, run_dir, attempts, job)
            break
        return collect_result(run_dir, job_hash, started, time.perf_counter() - t0, provenance, failure)

    def _submit(self, run_dir: Path) -> str:
        proc = _run(["sbatch", "--parsable", f"--chdir={os.getcwd()}", str(run_dir / "slurm.sh")])
        if proc.returncode != 0:
            raise UserError(f"sbatch refused the job in {run_dir}: {_first_error(proc)}")
        job_id = proc.stdout.strip().split(";")[0]
        with _SUBMITTED_LOCK:
            _SUBMITTED[job_id] = str(run_dir)
        return job_id

    def _wait(self, job_id: str, tail: "_LogTail") -> tuple[str, str]:
        """The job's end state. UNKNOWN (neither scontrol nor sacct knows the job) is an end state too
        once it lasts `lost_after_s`: a cluster without accounting forgets a finished job after
        MinJobAge, and the poll would otherwise never end. A shorter gap (a controller restart) is waited out."""
        unknown_since: float | None = None
        while True:
            check_stopping()  # an interrupted matrix: the except in run() cancels this job
            state, exit_code = job_state(job_id)
            tail.poll()
            if state in FINISHED:
                return state, exit_code
            if state != "UNKNOWN":
                unknown_since = None
            elif unknown_since is None:
                unknown_since = time.monotonic()
            elif time.monotonic() - unknown_since >= self.config.lost_after_s:
                return state, exit_code
            time.sleep(self.config.poll_s)

    def _failure(self, job_id, state, exit_code, run_dir: Path, attempts, job: Job) -> ErrorInfo | None:
        """None when the job's own result.json decides (COMPLETED, or FAILED after the job wrote it)."""
        if state in ("COMPLETED", "FAILED", "UNKNOWN") and (run_dir / "result.json").exists():
            return None
        if state == "UNKNOWN":
            return ErrorInfo(type="crash", message=f"slurm job {job_id} is known to neither scontrol nor sacct "
                                                   f"(for {self.config.lost_after_s:.0f} s) and left no result")
        if state in SLURM_ERRORS:
            what = {"TIMEOUT": f"exceeded its Slurm time limit of {time_minutes(self.config, job)} min",
                    "PREEMPTED": f"was preempted {len(attempts)} times (max_resubmits {self.config.max_resubmits})"}
            return ErrorInfo(type=SLURM_ERRORS[state],
                             message=f"slurm job {job_id} {what.get(state, 'ended ' + state)} (exit code {exit_code})")
        return ErrorInfo(type="crash", message=f"slurm job {job_id} ended {state} (exit code {exit_code}) without a result")

    @staticmethod
    def _record(run_dir: Path, attempts: list[dict]) -> None:
        """`slurm.json` in the run dir: every submission of this job, with its Slurm id and end state."""
        write_atomic(run_dir / SUBMISSIONS_FILE, json.dumps({"attempts": attempts}, indent=2) + "\n")


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


_PROBE = "from llmcbench.driver.environment import local_environment_id; print(local_environment_id())"


@lru_cache(maxsize=None)
def _python_environment_id(python: str) -> str:
    """`local_environment_id()` as `python` (slurm.python) computes it: its Python and library versions and
    the llmcbench sources it imports, which are what its jobs run. Asked once per interpreter, with the
    working directory and environment the jobs get (sbatch --chdir, the exported environment)."""
    try:
        proc = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    except OSError as e:
        raise UserError(f"slurm.python {python} cannot be run here ({e.strerror or e}): it must be an interpreter on "
                        "the shared filesystem, with llmcbench importable") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"slurm.python {python} did not report its environment in 300 s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("local:"):
        why = ([ln.strip() for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit code {proc.returncode}"])[-1]
        raise UserError(f"slurm.python {python} cannot report its environment (the job hash's identity): {why}")
    return lines[-1].strip()


class _LogTail:
    """New lines of a log file that another machine appends to, handed to `on_line`."""

    def __init__(self, path: Path, on_line: Callable[[str], None] | None):
        self.path, self.on_line = path, on_line
        self.offset = path.stat().st_size if path.exists() else 0
        self.buf = b""

    def poll(self) -> None:
        if self.on_line is None or not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        *lines, self.buf = (self.buf + chunk).replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            if line.strip():
                self.on_line(line.decode(errors="replace"))

    def emit(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")
