"""The docker runner: each job in its own container, through the volume contract.

A compress job runs in its method's image, an eval job in the eval image (both built by
`llmcbench images build`, found by the tag of the current sources; see driver/images.py).
The container gets exactly the contract's mounts:

    /job/job.json     ro   the run dir's job.json
    /models/<name>    ro   the input model (a compress job's artifact for a compressed eval)
    /data             ro   the staged data dir
    /out              rw   the run dir: the job writes model/, packed/ and result.json
    /out/job.json     ro   the same job.json, the store's copy: a job cannot rewrite the record of what it ran

and runs with no network, as a non-root user (the invoking user's uid and groups; a fixed
unprivileged uid when the driver runs as root, with the run dir handed over for the run and
taken back afterwards), all capabilities dropped, no privilege escalation, memory, shm and
pid limits, GPUs only when the job's device is CUDA (device requests, `--gpus` semantics).
Its output is streamed to `out/log.txt` and to the progress line. Past the job's wall-clock
limit the container is killed and the driver writes the failed result (`timeout`); a
container killed otherwise or out of memory is recorded as such, with its log kept.
"""

from __future__ import annotations

import os
import stat
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from filelock import Timeout

from ..contract import ErrorInfo, Job, Provenance, Result
from ..dockerhost import connect, device_requests, docker_sdk, nvidia_runtime, parse_gpus
from ..errors import StoreError, UserError
from . import check_stopping, collect_result, model_inputs

JOB_COMMAND = ["python", "-m", "llmcbench.driver.jobrun", "--job", "/job/job.json", "--models", "/models",
               "--data", "/data", "--out", "/out"]
ROOT_FALLBACK_UID = 1000
DEFAULT_SHM_BYTES = 2 << 30
# The labels that tie a container to its job: `_remove_orphans` finds a dead driver's by them.
JOB_HASH_LABEL, KIND_LABEL, RUN_DIR_LABEL = "org.llmcbench.job_hash", "org.llmcbench.kind", "org.llmcbench.run_dir"

_RUNNING: dict[str, object] = {}  # id -> container of every job container this driver runs
_REMOVED: set[str] = set()  # those remove_containers force-removed: interrupted, not crashed
_RUNNING_LOCK = threading.Lock()


def remove_containers() -> list[str]:
    """Force-remove every job container still running (terminate_all: Ctrl-C, SIGTERM).

    A worker thread blocked in `container.wait()` returns once its container is gone, and its
    runner reports the job interrupted instead of a crash. Returns the removed containers' ids."""
    with _RUNNING_LOCK:
        running = list(_RUNNING.items())
        _REMOVED.update(cid for cid, _ in running)
    for _, container in running:
        try:
            container.remove(force=True)
        except Exception:  # noqa: BLE001 - already gone, or the daemon went away: nothing left to stop
            pass
    return [cid for cid, _ in running]


def _track(container) -> None:
    """Register a created container, where remove_containers finds it. terminate_all sets the
    stop flag before it removes: a container registered too late for it is refused here."""
    with _RUNNING_LOCK:
        _RUNNING[container.id] = container
    check_stopping()


def _untrack(container) -> bool:
    """Forget a container; True when remove_containers removed it (the driver was interrupted)."""
    if container is None:
        return False
    with _RUNNING_LOCK:
        _RUNNING.pop(container.id, None)
        if container.id in _REMOVED:
            _REMOVED.discard(container.id)
            return True
    return False


class DockerRunner:
    name = "docker"

    def __init__(self, gpus: str | list[str] | None = None, client=None):
        self.gpus = parse_gpus(gpus) if isinstance(gpus, str) or gpus is None else list(gpus)
        self.client = client or connect()
        self._info = None
        self._images: dict[str, object] = {}
        if self.gpus is not None:
            self._check_gpu_support()

    # ------------------------------------------------------------ identity and images

    @property
    def info(self) -> dict:
        if self._info is None:
            self._info = self.client.info()
        return self._info

    def _check_gpu_support(self) -> None:
        if nvidia_runtime(self.info) is None:
            raise UserError("GPUs were requested (--gpus or a CUDA job) but this Docker daemon has no NVIDIA runtime: "
                            "install the NVIDIA container toolkit (nvidia-ctk runtime configure --runtime=docker) and "
                            "restart dockerd, or run on CPU (--device cpu)")

    def image_for(self, job: Job):
        """The built image that runs `job`: the method image for compress, the eval image for eval
        and torch_native deploy jobs, a backend's deploy image (e.g. deploy-vllm-cpu) for the others."""
        from .. import images

        key = images.job_image_name(job)  # the Slurm runner's image files are named alike
        if key not in self._images:
            if job.kind == "compress":
                spec = images.method_spec(self.client, job.method)
            elif key == "eval":
                spec = images.eval_spec(self.client)
            else:
                spec = images.deploy_spec(self.client, key)
            self._images[key] = images.find_image(self.client, spec)
        return self._images[key]

    def environment_id(self, job: Job | None = None) -> str:
        """The image id (content digest) of the image that runs `job`: part of the job's hash.

        Also the runner's preflight: a job this runner cannot run (image not built, data on
        the hub, GPUs without an NVIDIA runtime) fails here, before anything is written.
        """
        if job is None:
            raise UserError("the docker runner's environment depends on the job (method image or eval image)")
        self._check_job(job)
        return f"docker:{self.image_for(job).id}"

    def _check_job(self, job: Job) -> None:
        reads_hub = (job.calibration is not None and job.calibration.source == "hub") or \
                    (job.evaluation is not None and job.evaluation.data_source == "hub")
        if reads_hub:
            raise UserError("the docker runner runs jobs without network, but this job reads its data from the hub: "
                            "pass --data-dir with a staged copy (hf/<id>/<config>/<split>.jsonl), or set "
                            "HF_HUB_OFFLINE=1 to use the shipped slices")
        if job.device.startswith("cuda"):
            self._check_gpu_support()
            index = job.device.partition(":")[2]
            if isinstance(self.gpus, list) and index.isdigit() and int(index) >= len(self.gpus):
                raise UserError(f"--gpus {','.join(self.gpus)} gives the container {len(self.gpus)} GPU(s), numbered from "
                                f"cuda:0, so device {job.device} does not exist there: use --device cuda")

    # ------------------------------------------------------------ running

    def container_user(self) -> tuple[int, int, list[int]]:
        uid, gid = os.getuid(), os.getgid()
        if uid == 0:
            fallback = int(os.environ.get("LLMCBENCH_CONTAINER_UID", ROOT_FALLBACK_UID))
            if fallback == 0:
                raise UserError("LLMCBENCH_CONTAINER_UID=0: containers never run as root")
            return fallback, fallback, []
        return uid, gid, [g for g in os.getgroups() if g != gid]

    def container_config(self, job: Job, job_hash: str, run_dir: Path, model_path: Path, data_dir: Path,
                         image, command: list[str] | None = None) -> dict:
        """Everything `containers.create` gets for this job (the contract's mounts and limits)."""
        uid, gid, groups = self.container_user()
        mounts = {
            str((run_dir / "job.json").resolve()): {"bind": "/job/job.json", "mode": "ro"},
            str(Path(data_dir).resolve()): {"bind": "/data", "mode": "ro"},
            str(run_dir.resolve()): {"bind": "/out", "mode": "rw"},
        }
        for host, name in model_inputs(job.model.name, model_path):
            mounts[str(host)] = {"bind": f"/models/{name}", "mode": "ro"}
        for host, container in (_symlink_mounts(Path(model_path), f"/models/{job.model.name}")
                                + _symlink_mounts(Path(data_dir), "/data")):
            mounts.setdefault(host, {"bind": container, "mode": "ro"})
        memory = job.limits.memory_bytes or _default_memory_bytes()
        shm = min(int(os.environ.get("LLMCBENCH_DOCKER_SHM_BYTES", DEFAULT_SHM_BYTES)), memory // 2)
        tag = next(iter(image.tags), image.id)
        env = {
            "LLMCBENCH_JOB_HASH": job_hash, "LLMCBENCH_RUNNER": self.name,
            "LLMCBENCH_IMAGE": tag, "LLMCBENCH_IMAGE_DIGEST": image.id,
            "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HOME": "/tmp",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        }
        cfg = dict(
            image=image.id, command=command or JOB_COMMAND, entrypoint="", environment=env,
            volumes=mounts, working_dir="/tmp", user=f"{uid}:{gid}", group_add=[str(g) for g in groups] or None,
            network_mode="none", mem_limit=memory, memswap_limit=memory, shm_size=shm, pids_limit=4096,
            cap_drop=["ALL"], security_opt=["no-new-privileges"], init=True, detach=True,
            name=f"llmcbench-{job.kind}-{job_hash[:12]}-{uuid.uuid4().hex[:6]}",
            labels={JOB_HASH_LABEL: job_hash, KIND_LABEL: job.kind, RUN_DIR_LABEL: str(run_dir)},
        )
        # the run dir holds job.json, which the store and `verify` read back: bound read-only over itself
        # (a second bind of one host path, so a Mount: `volumes` maps each host path once)
        cfg["mounts"] = [docker_sdk().types.Mount("/out/job.json", str((run_dir / "job.json").resolve()), type="bind", read_only=True)]
        requests = device_requests(job.device, self.gpus)
        if requests:
            cfg["device_requests"] = requests
        return cfg

    def run(self, job: Job, job_hash: str, run_dir: Path, model_path: Path, data_dir: Path,
            on_line: Callable[[str], None] | None = None, command: list[str] | None = None) -> Result:
        """Run one job in a container; always returns (and leaves) a result.json.

        `command` replaces the job process (tests use it to probe the container's confinement
        under exactly the job's configuration).
        """
        check_stopping()  # an interrupted matrix's worker thread starts no new job
        docker = docker_sdk()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        run_dir = Path(run_dir)
        image = self.image_for(job)
        uid, gid, _ = self.container_user()
        _check_readable([Path(model_path), Path(data_dir)], uid, gid)
        # the config first: what it refuses (a model's symlinks, the shm setting) leaves the run dir the driver's
        cfg = self.container_config(job, job_hash, run_dir, model_path, data_dir, image, command)
        handed_over = _hand_over(run_dir, uid, gid)
        timed_out, exit_code, oom_killed, error = False, None, False, None
        container = None
        try:
            with open(run_dir / "log.txt", "ab") as log:
                _remove_orphans(self.client, cfg["labels"], log, docker)
                try:
                    container = self.client.containers.create(**cfg)
                except docker.errors.APIError as e:
                    raise UserError(_api_error(e)) from None
                _track(container)
                streamer = _LogStreamer(container, log, on_line)
                try:
                    container.start()
                except docker.errors.APIError as e:
                    raise UserError(_api_error(e)) from None
                streamer.start()
                try:
                    timed_out, exit_code = _wait(container, time.monotonic() + job.limits.time_limit_s, docker)
                except docker.errors.APIError:
                    if container.id not in _REMOVED:  # the daemon's error, not our removal's
                        raise
                if _untrack(container):  # removed by terminate_all: no failed result, a resume reruns it
                    log.write(b"[llmcbench] container removed: the driver was interrupted\n")
                    raise KeyboardInterrupt
                streamer.join(timeout=30)
                if timed_out:
                    log.write(f"[llmcbench] container killed after the time limit of {job.limits.time_limit_s} s\n".encode())
            try:
                container.reload()
                state = container.attrs.get("State", {})
                oom_killed = bool(state.get("OOMKilled"))
                exit_code = state.get("ExitCode", exit_code) if exit_code is None else exit_code
            except docker.errors.NotFound:
                pass
        except BaseException:
            _untrack(container)
            _remove(container, docker)
            container = None
            raise
        finally:
            _untrack(container)
            _remove(container, docker)
            if handed_over:
                _take_back(run_dir)
        return self._collect(job, job_hash, run_dir, image, exit_code, timed_out, oom_killed, started,
                             time.perf_counter() - t0, error)

    def _collect(self, job, job_hash, run_dir, image, exit_code, timed_out, oom_killed, started, wall_s, error) -> Result:
        if timed_out:
            error = ErrorInfo(type="timeout", message=f"container killed after the time limit of {job.limits.time_limit_s} s")
        elif oom_killed and not (run_dir / "result.json").exists():
            error = ErrorInfo(type="oom", message="container killed by the out-of-memory killer "
                                                  f"(memory limit {_gib(job.limits.memory_bytes or _default_memory_bytes())})")
        elif error is None and not (run_dir / "result.json").exists():
            how = "killed (SIGKILL)" if exit_code == 137 else f"exited with code {exit_code}"
            error = ErrorInfo(type="crash", message=f"container {how} without writing a result")
        provenance = Provenance(runner=self.name, image=next(iter(image.tags), None), image_digest=image.id)
        return collect_result(run_dir, job_hash, started, wall_s, provenance, error)


# ---------------------------------------------------------------- helpers

class _LogStreamer(threading.Thread):
    """Copies the container's output, line by line, to log.txt and the progress callback."""

    def __init__(self, container, log, on_line):
        super().__init__(daemon=True)
        self.container, self.log, self.on_line = container, log, on_line

    def run(self) -> None:
        buf = b""
        try:
            for chunk in self.container.logs(stream=True, follow=True, stdout=True, stderr=True):
                buf += chunk
                *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
                for line in lines:
                    self._emit(line)
            if buf.strip():
                self._emit(buf)
        except Exception:  # noqa: BLE001 - the container went away (killed, removed): keep what we have
            pass

    def _emit(self, line: bytes) -> None:
        if not line.strip():
            return
        self.log.write(line + b"\n")
        self.log.flush()
        if self.on_line:
            self.on_line(line.decode(errors="replace").rstrip())


def _wait(container, deadline: float, docker) -> tuple[bool, int | None]:
    """Wait for the container to exit; kill it at the deadline. Returns (timed_out, exit code)."""
    import requests

    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            try:
                container.kill()
            except docker.errors.APIError:
                pass
            try:
                container.wait(timeout=60)
            except (requests.exceptions.RequestException, docker.errors.APIError):
                pass
            return True, None
        try:
            status = container.wait(timeout=max(1, min(int(remaining) + 1, 300)))
            return False, status.get("StatusCode")
        except requests.exceptions.RequestException:
            continue  # the wait request timed out: check the deadline and wait again
        except docker.errors.NotFound:
            return False, None


def _job_containers(client, docker, label) -> list:
    """The containers, running or exited, whose labels match `label` (a key, `key=value`, or a
    list of those, as the daemon's label filter takes them); a daemon error is one line."""
    try:
        return client.containers.list(all=True, filters={"label": label})
    except docker.errors.APIError as e:
        raise UserError(_api_error(e)) from None


def _remove_orphans(client, labels: dict[str, str], log, docker) -> None:
    """A driver that died without its cleanup (kill -9, the OOM killer, a lost session) leaves
    its job container behind, perhaps still running and writing into the run dir this run is
    about to use. The caller holds the job's lock, so a container of the same job and run dir
    belongs to a dead driver: it goes first, and the log says so."""
    keys = (JOB_HASH_LABEL, RUN_DIR_LABEL)
    for c in _job_containers(client, docker, [f"{k}={labels[k]}" for k in keys]):
        log.write(f"[llmcbench] removed container {c.name} ({c.status}) of this job, left by a driver that died\n".encode())
        _remove(c, docker)


def remove_left_containers(client, log: Callable[[str], None] = print) -> list[str]:
    """Remove the job containers no driver runs: those a driver that died left behind (exited,
    or still running and writing into its run dir) where no rerun of the job came to remove
    them (`_remove_orphans`). They hold disk and, while running, memory, and they keep their
    images from `images prune`. A driver holds its job's lock while the job's container exists
    (`Store.lock`), so a container whose lock is free, or whose run dir is gone, has no driver;
    one whose lock is held belongs to a job that is running and stays, as does one whose lock
    cannot be taken (another user's store). Returns the removed containers' names."""
    from ..store import Store

    docker = docker_sdk()
    removed = []
    for c in _job_containers(client, docker, JOB_HASH_LABEL):
        run_dir = Path(c.labels.get(RUN_DIR_LABEL, ""))
        lock = None
        if run_dir.is_absolute() and run_dir.is_dir():
            try:
                lock = Store(run_dir.parent.parent).lock(run_dir)
                lock.acquire(timeout=0)
            except Timeout:  # before OSError: filelock's Timeout is one
                log(f"kept container {c.name} ({c.status}): its job is running ({run_dir})")
                continue
            except (OSError, StoreError) as e:  # another user's store: whether its job runs cannot be told
                log(f"kept container {c.name} ({c.status}): its job's lock cannot be checked ({e})")
                continue
        try:
            c.remove(force=True)
        except docker.errors.NotFound:  # gone meanwhile
            pass
        except docker.errors.APIError as e:
            log(f"kept container {c.name} ({c.status}): the daemon did not remove it ({_api_error(e)})")
            continue
        finally:
            if lock is not None:
                lock.release()
        removed.append(c.name)
        log(f"removed container {c.name} ({c.status}), left by a driver that died ({run_dir})")
    return removed


def _remove(container, docker) -> None:
    if container is None:
        return
    try:
        container.remove(force=True)
    except docker.errors.APIError:
        pass


def _api_error(e) -> str:
    text = " ".join(str(getattr(e, "explanation", None) or e).split())
    if "could not select device driver" in text or "nvidia" in text.lower():
        return ("the container could not get GPUs: this Docker daemon has no NVIDIA runtime (install the NVIDIA "
                f"container toolkit and restart dockerd) [{text[:160]}]")
    return f"docker could not start the job's container: {text[:300]}"


def _default_memory_bytes() -> int:
    env = os.environ.get("LLMCBENCH_DOCKER_MEMORY_BYTES")
    if env:
        return int(env)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * 0.9)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _symlink_mounts(host_dir: Path, container_dir: str) -> list[tuple[str, str]]:
    """Extra read-only mounts that make the symlinks inside a mounted dir resolve in the container.

    A Hugging Face hub snapshot is a dir of links `../../blobs/<sha>`: mounting the snapshot
    alone leaves them dangling, so the folder holding the targets is mounted where each
    link points to from inside the container.
    """
    host_dir = Path(host_dir)
    extra: dict[str, str] = {}
    if not host_dir.is_dir():
        return []
    root = host_dir.resolve()
    for p in host_dir.rglob("*"):
        if not p.is_symlink():
            continue
        target = p.resolve()
        try:
            target.relative_to(root)
            continue  # stays inside the mount
        except ValueError:
            pass
        link = os.readlink(p)
        rel = p.parent.relative_to(host_dir).as_posix()
        where = os.path.normpath(link if os.path.isabs(link) else f"{container_dir}/{rel}/{link}")
        host_parent, container_parent = str(target.parent), os.path.dirname(where)
        if extra.get(host_parent, container_parent) != container_parent:
            raise UserError(f"{p}: its symlinks point to {host_parent} from two places; copy the model to a plain dir")
        extra[host_parent] = container_parent
    return list(extra.items())


def _readable_by(st: os.stat_result, uid: int, gid: int, is_dir: bool) -> bool:
    need_other, need_owner, need_group = (stat.S_IROTH, stat.S_IRUSR, stat.S_IRGRP)
    if is_dir:
        need_other |= stat.S_IXOTH
        need_owner |= stat.S_IXUSR
        need_group |= stat.S_IXGRP
    if st.st_uid == uid:
        return st.st_mode & need_owner == need_owner
    if st.st_gid == gid:
        return st.st_mode & need_group == need_group
    return st.st_mode & need_other == need_other


def _check_readable(paths: list[Path], uid: int, gid: int) -> None:
    """Inputs must be readable by the container's user: else a one-line error, before anything runs."""
    if uid == os.getuid():
        return  # the container runs as the invoking user: it reads what they read
    for top in paths:
        for p in [top, *top.rglob("*")]:
            try:
                st = p.stat()
            except OSError:
                continue
            if not _readable_by(st, uid, gid, stat.S_ISDIR(st.st_mode)):
                raise UserError(f"{p} is not readable by the container's user (uid {uid}; the driver runs as root and "
                                f"containers never do): make the input readable (chmod -R o+rX {top}) or run "
                                "llmcbench as a non-root user")


def _hand_over(run_dir: Path, uid: int, gid: int) -> bool:
    """When the driver runs as root, lend the run dir to the container's unprivileged user."""
    if os.getuid() != 0 or uid == 0:
        return False
    os.chown(run_dir, uid, gid)
    job = run_dir / "job.json"
    if job.exists():
        os.chmod(job, 0o644)
    return True


def _take_back(run_dir: Path) -> None:
    """Give the run dir and everything the container wrote back to the invoking user (root),
    readable by the containers of later jobs (the eval image reads a compress job's model/)."""
    uid, gid = os.getuid(), os.getgid()
    for p in [run_dir, *run_dir.rglob("*")]:
        try:
            os.lchown(p, uid, gid)
            if not p.is_symlink():
                mode = p.stat().st_mode
                os.chmod(p, mode | stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH
                         | ((stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH) if stat.S_ISDIR(mode) else 0))
        except OSError:
            pass
