"""`llmcbench doctor`: what this machine can run, and why not.

Checks Docker (SDK, binaries, daemon), the NVIDIA container runtime, the GPUs the host and
torch see, free disk, and which images are built for the current sources; then says which
runners and engines are usable here, each with its reason.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

MIN_FREE_GB = 20


@dataclass
class Check:
    name: str
    ok: bool | None  # None: informational / not applicable
    detail: str


@dataclass
class Verdict:
    what: str
    usable: bool
    why: str


@dataclass
class Diagnosis:
    checks: list[Check] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)


def diagnose(runs_dir: Path = Path("runs")) -> Diagnosis:
    from .dockerhost import connect, docker_installed, host_gpus, nvidia_runtime
    from .errors import UserError
    from .fsio import cache_dir
    from .registry import discover

    d = Diagnosis()
    add = d.checks.append
    add(Check("python", None, f"{platform.python_version()} ({platform.system()} {platform.machine()}), {os.cpu_count()} CPU cores"))

    # torch and GPUs as the host sees them
    try:
        import torch

        cuda = torch.cuda.is_available()
        n = torch.cuda.device_count() if cuda else 0
        names = [torch.cuda.get_device_name(i) for i in range(n)]
        add(Check("torch", True, f"{torch.__version__}; CUDA {'available: ' + ', '.join(names) if cuda else 'not available'}"))
    except ImportError:
        cuda, n = False, 0
        add(Check("torch", False, "not installed: pip install torch"))
    smi = host_gpus()
    add(Check("GPUs (nvidia-smi)", bool(smi) if shutil.which("nvidia-smi") else None,
              "; ".join(smi) if smi else ("nvidia-smi finds no GPU" if shutil.which("nvidia-smi") else "no nvidia-smi: no NVIDIA driver on this host")))

    # Docker
    client, daemon_why = None, ""
    try:
        import docker  # noqa: F401

        add(Check("docker SDK", True, f"docker {docker.__version__}"))
    except ImportError:
        add(Check("docker SDK", False, "the Python package 'docker' is missing: pip install docker"))
    cli = shutil.which("docker") or shutil.which("dockerd")
    add(Check("docker installed", docker_installed(), cli or "no docker/dockerd command and no daemon socket (apt-get install docker.io)"))
    info = {}
    try:
        client = connect(timeout_s=10)
        info = client.info()
        add(Check("docker daemon", True, f"{info.get('ServerVersion')} ({info.get('Driver')}, cgroup v{info.get('CgroupVersion', '?')}, "
                                         f"{info.get('NCPU')} CPUs, {info.get('MemTotal', 0) / 2**30:.0f} GiB)"))
    except UserError as e:
        daemon_why = str(e)
        add(Check("docker daemon", False, daemon_why))
    runtime = nvidia_runtime(info) if client else None
    add(Check("NVIDIA container runtime", bool(runtime) if client else None,
              runtime or ("none: containers cannot get GPUs (install the NVIDIA container toolkit)" if client else "daemon not reachable")))

    # Disk
    places = [("runs dir", Path(runs_dir))]
    try:
        places.append(("cache", cache_dir()))
    except UserError as e:  # LLMCBENCH_CACHE=~nosuchuser: a failed check in the table, not an abort
        add(Check("cache", False, str(e)))
    if info.get("DockerRootDir"):
        places.append(("docker root", Path(info["DockerRootDir"])))
    for label, p in places:
        q = p
        while not q.exists() and q != q.parent:
            q = q.parent
        try:
            free = shutil.disk_usage(q).free / 1e9
        except OSError:
            continue
        add(Check(f"free disk ({label})", free >= MIN_FREE_GB, f"{free:.0f} GB free at {q}" + ("" if free >= MIN_FREE_GB else f" (below {MIN_FREE_GB} GB)")))

    # Images for the current sources
    built, missing = [], []
    if client:
        from . import images

        try:
            base = images.base_spec(client)
            offline = images._image_id(client, images.OFFLINE_BASE)
            add(Check("offline base", bool(offline) or None, images.OFFLINE_BASE + (" present" if offline else " not built (images/offline-base.sh)")))
            add(Check("base image", None, f"FROM {base.base_image}" + ("" if base.base_image_id else " (not present locally)")))
            specs = [base, images.eval_spec(client, base)] + [images.method_spec(client, m, base) for m in discover()]
            for s in specs:
                (built if images._image_id(client, s.tag) else missing).append(s)
            add(Check("images built", not missing,
                      (f"{len(built)}/{len(specs)} for the current sources"
                       + (f"; missing: {', '.join(s.target for s in missing)} (llmcbench images build all)" if missing else ""))))
        except UserError as e:
            add(Check("images", False, str(e)))

    # Slurm: the client commands and whether the controller answers
    slurm_ok, slurm_why = _slurm(add)

    # Verdicts
    v = d.verdicts.append
    v(Verdict("runner local", True, "jobs run as child processes of the driver on this host"))
    if client is None:
        v(Verdict("runner docker", False, daemon_why or "docker is not usable here"))
    elif missing:
        names = sorted({s.target for s in missing})
        ready = sorted(s.target for s in built if s.role == "method") if not any(s.role in ("base", "eval") for s in missing) else []
        v(Verdict("runner docker", bool(ready),
                  (f"ready for {', '.join(ready)}; " if ready else "daemon up; ")
                  + f"images to build first: {', '.join(names)} (`llmcbench images build {'all' if len(names) > 1 else names[0]}`)"))
    else:
        v(Verdict("runner docker", True, "daemon up and every image built for the current sources"))
    v(Verdict("runner slurm", slurm_ok, slurm_why))
    v(Verdict("engine reference (cpu)", True, "pure PyTorch: runs on any CPU (slowly on big models)"))
    v(Verdict("engine reference (cuda)", cuda, f"{n} CUDA GPU(s) visible to torch" if cuda else "no CUDA GPU visible to torch"))
    if client:
        gpu_docker = bool(runtime) and bool(smi)
        v(Verdict("docker jobs on GPU", gpu_docker, "NVIDIA runtime and GPUs present" if gpu_docker
                  else ("no NVIDIA container runtime" if not runtime else "no GPU on the host")))
    upstream_methods = [name for name, s in discover().items() if "upstream" in s.engines]
    v(upstream_verdict(upstream_methods, _upstream_in_images(client, built), cuda))
    return d


def _upstream_in_images(client, built) -> set[str]:
    """The methods whose image, built for the current sources, holds its upstream checkout
    (an image built offline has none: its label says so)."""
    from . import images

    held = set()
    for spec in built:
        if spec.role == "method":
            up = images._upstream_from_labels(client.images.get(spec.tag))
            if up and up["fetched"]:
                held.add(spec.method)
    return held


def upstream_verdict(methods: list[str], in_images: set[str], cuda: bool) -> Verdict:
    """Which methods' original code can run here, from where, and on which device. Upstream's
    code lives in the method image or in a checkout under LLMCBENCH_UPSTREAM_DIR; without a
    CUDA GPU it still runs with `--device cpu` (the shim maps its hard-coded CUDA calls to the
    CPU), which is slow and meant for small models: a check, not a paper run."""
    from ..methods._upstream.staging import UpstreamUnavailable, upstream_repo

    if not methods:
        return Verdict("engine upstream", False, "no method declares an upstream engine yet (methods/<name>/method.toml [engines.upstream])")
    where = {}
    for m in methods:
        try:
            where[m] = f"checkout {upstream_repo(m)}"
        except UpstreamUnavailable:
            if m in in_images:
                where[m] = "in its image"
    missing = [m for m in methods if m not in where]
    parts = [", ".join(f"{m} ({w})" for m, w in where.items())] if where else []
    if where:
        parts.append("on the GPU" if cuda else "no CUDA GPU: --device cpu only (upstream's CUDA calls mapped to the CPU; "
                                               "slow, for small models)")
    if missing:
        parts.append(f"no upstream code for {', '.join(missing)}: `llmcbench images build <method>` where GitHub is "
                     "reachable, or set LLMCBENCH_UPSTREAM_DIR to a folder of checkouts")
    return Verdict("engine upstream", bool(where), "; ".join(parts))


def _slurm(add) -> tuple[bool, str]:
    """Check `sbatch` and the controller (`sinfo`); (usable, why) for the slurm runner's verdict."""
    import subprocess

    sbatch = shutil.which("sbatch")
    add(Check("sbatch", bool(sbatch) or None, sbatch or "not on the PATH (no Slurm client here)"))
    if not sbatch:
        return False, "no sbatch on the PATH: run the driver on a login node of a Slurm cluster"
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%P %a %D %G"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        p = subprocess.CompletedProcess([], 1, "", f"sinfo did not answer ({type(e).__name__})")
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or ["sinfo failed"])[-1]
        add(Check("slurm cluster", False, why))
        return False, f"sbatch present but the cluster does not answer: {why}"
    parts = [" ".join(line.split()[:1] + [f"({line.split()[2]} node(s), GRES {line.split()[3]})"])
             for line in p.stdout.splitlines() if len(line.split()) >= 4]
    add(Check("slurm cluster", True, "partitions: " + "; ".join(parts)))
    return True, "the cluster answers: `--runner slurm` submits one Slurm job per contract job"
