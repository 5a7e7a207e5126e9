"""The local runner: each job in a child process, with the volume contract's layout.

A staging directory mirrors the container mounts (`job/job.json`, `models/<name>`,
`data`, `out`) through symlinks into the store, so the job process cannot tell whether
it runs in Docker or here. The child runs in its own session, so a time limit kills the
whole process group; its stdout and stderr go to `out/log.txt`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..contract import ErrorInfo, Job, Provenance, Result
from ..environment import local_environment_id
from . import check_stopping, collect_result, model_inputs, with_upstream_interpreter


_CHILDREN: set[int] = set()  # process groups of the running job processes (all runners of this driver)
_KILLED: set[int] = set()  # those terminate_children killed: interrupted, not out of memory
_CHILDREN_LOCK = threading.Lock()


def terminate_children() -> None:
    """Kill every job process group still running: an interrupted matrix leaves no orphans.

    The killed groups are remembered: their runners report the job interrupted, not `oom`
    (a SIGKILL without a result is otherwise what the out-of-memory killer leaves)."""
    with _CHILDREN_LOCK:
        for pgid in list(_CHILDREN):
            _KILLED.add(pgid)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    """Start the job process unless the driver is stopping; registered under the lock that
    terminate_children takes, so a process started while it runs is either refused or killed."""
    with _CHILDREN_LOCK:
        check_stopping()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _CHILDREN.add(proc.pid)
    return proc


def _was_killed(pid: int) -> bool:
    with _CHILDREN_LOCK:
        _CHILDREN.discard(pid)
        if pid in _KILLED:
            _KILLED.discard(pid)
            return True
    return False


class LocalRunner:
    name = "local"

    def __init__(self, cuda_visible: str | None = None):
        self.cuda_visible = cuda_visible

    def environment_id(self, job: Job | None = None) -> str:
        """The host's library versions and the project's source digest (and an upstream job's interpreter)."""
        return with_upstream_interpreter(local_environment_id(), job)

    def run(self, job: Job, job_hash: str, run_dir: Path, model_path: Path, data_dir: Path,
            on_line: Callable[[str], None] | None = None) -> Result:
        check_stopping()  # an interrupted matrix's worker thread starts no new job
        run_dir = Path(run_dir).resolve()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="llmcbench-stage-") as stage:
            stage = Path(stage)
            (stage / "job").mkdir()
            (stage / "models").mkdir()
            os.symlink(run_dir / "job.json", stage / "job" / "job.json")
            for host, name in model_inputs(job.model.name, model_path):
                os.symlink(host, stage / "models" / name)
            os.symlink(Path(data_dir).resolve(), stage / "data")
            os.symlink(run_dir, stage / "out")
            cmd = [sys.executable, "-m", "llmcbench.driver.jobrun", "--job", str(stage / "job" / "job.json"),
                   "--models", str(stage / "models"), "--data", str(stage / "data"), "--out", str(stage / "out")]
            env = {**os.environ, "LLMCBENCH_JOB_HASH": job_hash, "LLMCBENCH_RUNNER": self.name,
                   "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
            if self.cuda_visible is not None:
                env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible
            timed_out = False
            with open(run_dir / "log.txt", "ab") as log:
                proc = _start(cmd, env)
                deadline = time.monotonic() + job.limits.time_limit_s
                try:
                    for line in _lines(proc, deadline):
                        log.write(line)
                        log.flush()
                        if on_line:
                            on_line(line.decode(errors="replace").rstrip())
                except TimeoutError:
                    timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                except BaseException:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    _was_killed(proc.pid)
                    raise
                try:  # output closed is not the job over: the time limit still holds until it exits
                    rc = proc.wait(timeout=None if timed_out else max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
                if _was_killed(proc.pid):  # the driver was interrupted: no failed result, a resume reruns it
                    log.write(b"[llmcbench] job killed: the driver was interrupted\n")
                    raise KeyboardInterrupt
        return self._collect(job_hash, run_dir, rc, timed_out, started, time.perf_counter() - t0, job)

    def _collect(self, job_hash, run_dir, rc, timed_out, started, wall_s, job) -> Result:
        failure, wrote_result = None, (run_dir / "result.json").exists()
        if timed_out:
            failure = ErrorInfo(type="timeout", message=f"killed after the time limit of {job.limits.time_limit_s} s")
        elif not wrote_result and rc < 0 and -rc == signal.SIGKILL:
            failure = ErrorInfo(type="oom", message="killed by SIGKILL (most likely the out-of-memory killer)")
        elif not wrote_result:
            failure = ErrorInfo(type="crash", message=f"job process exited with code {rc} without a result")
        return collect_result(run_dir, job_hash, started, wall_s, Provenance(runner=self.name), failure)


def _lines(proc: subprocess.Popen, deadline: float):
    """Yield the child's output lines, raising TimeoutError past the deadline."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if not sel.select(timeout=min(remaining, 1.0)):
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            if line.strip():
                yield line + b"\n"
    if buf.strip():
        yield buf + b"\n"
