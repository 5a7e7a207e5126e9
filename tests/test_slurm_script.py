"""The slurm runner's command lines and state mapping, without a cluster.

Apptainer and enroot/pyxis are not installable on the test machines, so their command lines
are checked here against what those tools document: the volume contract as bind mounts (the
inputs read-only, /out writable), GPUs only for a CUDA job (`--nv`; pyxis takes them from the
allocation), a clean environment with the job hash passed in. The local runtime's script is
also run with plain bash (no Slurm) to show it stages the contract and runs the job process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmcbench.driver.contract import Job
from llmcbench.driver.runners.slurm import FINISHED, SLURM_ERRORS
from llmcbench.driver.runners.slurm_script import SlurmConfig, batch_script, contract_mounts, job_command, resource_args


def _job(kind="compress", device="cpu", time_limit_s=3600, memory_bytes=None) -> Job:
    return Job.model_validate({"kind": kind, "method": "wanda" if kind == "compress" else "dense",
                               "model": {"name": "llama-2-7b", "source": "local", "identity": "sha256:x"},
                               "device": device, "limits": {"time_limit_s": time_limit_s, "memory_bytes": memory_bytes}})


MOUNTS = contract_mounts(Path("/store/cell/h"), [(Path("/hub/llama"), "llama-2-7b")], Path("/data"))


def test_contract_mounts_match_the_docker_runner():
    assert MOUNTS == [(Path("/store/cell/h/job.json"), "/job/job.json", True), (Path("/hub/llama"), "/models/llama-2-7b", True),
                      (Path("/data"), "/data", True), (Path("/store/cell/h"), "/out", False)]


def test_apptainer_command_line():
    cfg = SlurmConfig(runtime="apptainer", image_dir="/sif")
    gpu = job_command(cfg, _job(device="cuda"), MOUNTS)
    assert gpu[:2] == ["apptainer", "exec"] and "--nv" in gpu and "--containall" in gpu and "--cleanenv" in gpu
    binds = [gpu[i + 1] for i, a in enumerate(gpu) if a == "--bind"]
    assert binds == ["/store/cell/h/job.json:/job/job.json:ro", "/hub/llama:/models/llama-2-7b:ro", "/data:/data:ro",
                     "/store/cell/h:/out"]
    assert "LLMCBENCH_JOB_HASH=${LLMCBENCH_JOB_HASH:-}" in gpu
    image = gpu.index("/sif/method-wanda.sif")
    assert gpu[image + 1:image + 5] == ["python", "-u", "-m", "llmcbench.driver.jobrun"]
    assert gpu[-8:] == ["--job", "/job/job.json", "--models", "/models", "--data", "/data", "--out", "/out"]
    cpu = job_command(cfg, _job(kind="eval"), MOUNTS)
    assert "--nv" not in cpu and "/sif/eval.sif" in cpu  # evaluations run in the eval image


def test_enroot_pyxis_command_line():
    cfg = SlurmConfig(runtime="enroot", image_dir="/sqsh")
    cmd = job_command(cfg, _job(device="cuda"), MOUNTS)
    assert cmd[:2] == ["srun", "--ntasks=1"]
    assert "--container-image=/sqsh/method-wanda.sqsh" in cmd and "--no-container-mount-home" in cmd
    assert ("--container-mounts=/store/cell/h/job.json:/job/job.json:ro,/hub/llama:/models/llama-2-7b:ro,"
            "/data:/data:ro,/store/cell/h:/out") in cmd
    assert cmd[cmd.index("python"):][:4] == ["python", "-u", "-m", "llmcbench.driver.jobrun"]


def test_resource_request():
    cfg = SlurmConfig(partition="a100", account="lab", qos="high", gpus_per_job=2, cpus_per_task=8,
                      extra_args=["--constraint=80gb"])
    args = resource_args(cfg, _job(device="cuda", time_limit_s=3601))
    assert args == ["--time=61", "--partition=a100", "--account=lab", "--qos=high", "--gres=gpu:2", "--cpus-per-task=8",
                    "--constraint=80gb"]
    cpu = resource_args(SlurmConfig(time_limit_s=30), _job(memory_bytes=3 * 2**30 + 1))
    assert cpu == ["--time=1", "--mem=3073M"]  # whole minutes, at least one; no GPU for a CPU job
    assert resource_args(SlurmConfig(mem_gb=64), _job()) == ["--time=60", "--mem=65536M"]


def test_every_end_state_is_classified():
    assert set(SLURM_ERRORS.values()) <= {"oom", "timeout", "cancelled", "node_fail", "preempted"}
    for state in ("OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "CANCELLED", "COMPLETED", "FAILED"):
        assert state in FINISHED
    assert not {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "SUSPENDED"} & FINISHED


def _runner_polling(monkeypatch, states, **cfg):
    """A SlurmRunner whose job_state answers `states` in turn (the last one for ever)."""
    from llmcbench.driver.runners import slurm

    seen = iter(states)
    last = [None]

    def job_state(job_id):
        last[0] = next(seen, last[0])
        return last[0]

    monkeypatch.setattr(slurm, "job_state", job_state)
    runner = slurm.SlurmRunner.__new__(slurm.SlurmRunner)
    runner.config = SlurmConfig(poll_s=0.01, **cfg)
    return runner


def test_a_job_slurm_forgot_is_given_up_after_lost_after_s(monkeypatch, tmp_path):
    """Without accounting, a finished job vanishes from scontrol after MinJobAge and sacct never knew
    it: the poll ends after lost_after_s, the job's own result.json decides if it wrote one, and
    without one the cell is a crash that says so. A short gap (a controller restart) is waited out."""
    from llmcbench.driver.runners import reset_stopping
    from llmcbench.driver.runners.slurm import _LogTail

    reset_stopping()
    tail = _LogTail(tmp_path / "log.txt", None)
    runner = _runner_polling(monkeypatch, [("RUNNING", ""), ("UNKNOWN", "")], lost_after_s=0.2)
    assert runner._wait("7", tail) == ("UNKNOWN", "")
    failure = runner._failure("7", "UNKNOWN", "", tmp_path, [{}], _job())
    assert failure.type == "crash" and "neither scontrol nor sacct" in failure.message
    (tmp_path / "result.json").write_text("{}")
    assert runner._failure("7", "UNKNOWN", "", tmp_path, [{}], _job()) is None

    runner = _runner_polling(monkeypatch, [("UNKNOWN", "")] * 3 + [("RUNNING", ""), ("COMPLETED", "0:0")],
                             lost_after_s=60)
    assert runner._wait("8", tail) == ("COMPLETED", "0:0")


def test_an_interrupted_driver_stops_polling(monkeypatch, tmp_path):
    """After terminate_all (a matrix's Ctrl-C) a worker thread's poll raises at once, so run() cancels its job."""
    from llmcbench.driver import runners
    from llmcbench.driver.runners.slurm import _LogTail

    runner = _runner_polling(monkeypatch, [("RUNNING", "")])
    runners._STOPPING.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner._wait("9", _LogTail(tmp_path / "log.txt", None))
    finally:
        runners.reset_stopping()


@pytest.mark.parametrize("runtime", ["local", "apptainer", "enroot"])
def test_batch_script_is_valid_bash(runtime, tmp_path):
    cfg = SlurmConfig(runtime=runtime, image_dir="/sif", partition="gpu")
    script = batch_script(cfg, _job(device="cuda"), "ab" * 32, tmp_path, [(Path("/hub/llama"), "llama-2-7b")],
                          Path("/data"), "llmcb-compress-wanda-abab", "llmcbench:/store")
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --partition=gpu" in script
    assert f"#SBATCH --output={tmp_path / 'log.txt'}" in script and "#SBATCH --open-mode=append" in script
    (tmp_path / "s.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sh")]).returncode == 0


def test_local_script_stages_the_contract_and_runs_the_job(tmp_path, tiny_llama_dir, data_dir):
    """The local runtime's batch script, run by plain bash (no Slurm): it stages the contract
    in the node's TMPDIR, the job process compresses the model through it (the no-op test
    method) and writes its result and artifact into the run dir, and the stage is removed."""
    from llmcbench.driver.fsio import write_record

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = Job.model_validate({"kind": "compress", "method": "hang_inject", "preset": "ok", "params": {"seconds": 0},
                              "model": {"name": "tiny", "source": "local", "identity": "sha256:x"},
                              "calibration": {"nsamples": 2, "seqlen": 16}})
    write_record(run_dir / "job.json", job)
    script = batch_script(SlurmConfig(), job, "cd" * 32, run_dir, [(tiny_llama_dir, "tiny")], data_dir, "n", "llmcbench:/x")
    (run_dir / "slurm.sh").write_text(script)
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(node_tmp), "LLMCBENCH_METHODS_PATH": str(Path(__file__).parent / "fixtures" / "methods")}
    proc = subprocess.run(["bash", str(run_dir / "slurm.sh")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["job_hash"] == "cd" * 32 and result["provenance"]["runner"] == "slurm"
    assert (run_dir / "model" / "compression.json").is_file()
    assert list(node_tmp.iterdir()) == []  # the stage is removed on exit


# ---------------------------------------------------------------- images, provenance, mounts, identity

def _deploy_job(backend="vllm", device="cuda") -> Job:
    return Job.model_validate({"kind": "deploy", "method": "dense", "model": {"name": "llama-2-7b", "source": "local",
                               "identity": "sha256:x"}, "device": device, "deploy": {"backend": backend}})


def _docker_image_key(job: Job, monkeypatch) -> str:
    """The image name the docker runner looks up for `job` (no daemon: the spec lookups are faked)."""
    from types import SimpleNamespace

    from llmcbench.driver import images
    from llmcbench.driver.runners.docker import DockerRunner

    monkeypatch.setattr(images, "method_spec", lambda client, method: f"method-{method}")
    monkeypatch.setattr(images, "eval_spec", lambda client: "eval")
    monkeypatch.setattr(images, "deploy_spec", lambda client, name: name)
    monkeypatch.setattr(images, "find_image", lambda client, spec: SimpleNamespace(name=spec))
    return DockerRunner(client=object()).image_for(job).name


@pytest.mark.parametrize("job", [_job(), _job(kind="eval"), _deploy_job("torch_native", "cpu"), _deploy_job("vllm", "cuda"),
                                 _deploy_job("vllm", "cpu"), _deploy_job("tensorrt_llm", "cuda:0")],
                         ids=["compress", "eval", "torch_native", "vllm", "vllm-cpu", "tensorrt_llm"])
@pytest.mark.parametrize("runtime", ["apptainer", "enroot"])
def test_every_job_runs_in_the_docker_runners_image(job, runtime, monkeypatch):
    """A deploy job runs in its backend's image (deploy-vllm.sif, deploy-vllm-cpu.sqsh, ...), torch_native in
    the eval image: the converted images are the docker runner's, so are their names."""
    from llmcbench.driver.runners.slurm_script import image_path

    cfg = SlurmConfig(runtime=runtime, image_dir="/img")
    suffix = {"apptainer": ".sif", "enroot": ".sqsh"}[runtime]
    assert image_path(cfg, job) == Path("/img") / (_docker_image_key(job, monkeypatch) + suffix)


def test_deploy_backends_have_their_own_environment_id(tmp_path):
    """Each backend's image is its own file, so its own environment identity (the job hash's)."""
    from llmcbench.driver.runners.slurm import SlurmRunner

    for name in ("deploy-vllm", "eval"):
        (tmp_path / f"{name}.sif").write_bytes(name.encode())
    runner = SlurmRunner.__new__(SlurmRunner)
    runner.config = SlurmConfig(runtime="apptainer", image_dir=str(tmp_path))
    assert runner.environment_id(_deploy_job("vllm")) != runner.environment_id(_deploy_job("torch_native"))


def _fake_tools(bin_dir: Path, dump: Path) -> dict:
    """`apptainer` and `srun` that write what the job would see (its environment and arguments) to `dump`."""
    bin_dir.mkdir()
    for tool in ("apptainer", "srun"):
        (bin_dir / tool).write_text(f'#!/bin/bash\n{{ env; printf "ARG %s\\n" "$@"; }} > {dump}\n')
        (bin_dir / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("runtime", ["apptainer", "enroot"])
def test_container_jobs_know_their_image_and_digest(runtime, tmp_path, monkeypatch):
    """A container job's result names its image and digest (jobrun reads LLMCBENCH_IMAGE[_DIGEST]): the
    batch script exports them, apptainer passes them through --cleanenv, and the digest is the image
    file's sha256, the one the environment id is made of. A failure the runner records carries both too."""
    import hashlib

    from llmcbench.driver.runners.slurm import SlurmRunner

    images_dir, run_dir = tmp_path / "img", tmp_path / "store" / "cell" / "h"
    images_dir.mkdir()
    run_dir.mkdir(parents=True)
    image = images_dir / ("eval.sif" if runtime == "apptainer" else "eval.sqsh")
    image.write_bytes(b"an image")
    digest = hashlib.sha256(b"an image").hexdigest()
    runner = SlurmRunner.__new__(SlurmRunner)
    runner.config = SlurmConfig(runtime=runtime, image_dir=str(images_dir))
    job = _job(kind="eval")
    assert runner.environment_id(job) == f"{runtime}:{digest[:16]}"  # unchanged: the cache keeps its hashes

    dump = tmp_path / "seen.txt"
    env = _fake_tools(tmp_path / "bin", dump)

    def run_script(_run_dir):  # stands in for sbatch: the batch script runs, the fake runtime records
        subprocess.run(["bash", str(run_dir / "slurm.sh")], env=env, check=True, timeout=60)
        return "17"

    monkeypatch.setattr(runner, "_submit", run_script)
    monkeypatch.setattr(runner, "_wait", lambda job_id, tail: ("FAILED", "1:0"))
    result = runner.run(job, "ef" * 32, run_dir, tmp_path / "model", tmp_path / "data")
    seen = dump.read_text().splitlines()
    if runtime == "apptainer":  # --cleanenv: only what --env passes reaches the job
        assert f"ARG LLMCBENCH_IMAGE={image}" in seen and f"ARG LLMCBENCH_IMAGE_DIGEST=sha256:{digest}" in seen
    else:  # pyxis starts the step with the job's environment
        assert f"LLMCBENCH_IMAGE={image}" in seen and f"LLMCBENCH_IMAGE_DIGEST=sha256:{digest}" in seen
    assert result.status == "failed"
    assert (result.provenance.image, result.provenance.image_digest) == (str(image), f"sha256:{digest}")


def _hub_snapshot(root: Path) -> Path:
    """A Hugging Face hub cache entry: the snapshot's files are links into ../../blobs."""
    repo = root / "models--org--llama"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "aaa").write_text("{}")
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to("../../blobs/aaa")
    return snap


@pytest.mark.parametrize("runtime", ["apptainer", "enroot"])
def test_hub_snapshot_links_resolve_in_the_container(runtime, tmp_path):
    """The blobs a hub snapshot links to are mounted where the links point from inside the container
    (/models/<name>/../../blobs = /blobs), as the docker runner mounts them."""
    from llmcbench.driver.runners.docker import _symlink_mounts

    snap = _hub_snapshot(tmp_path / "hub")
    blobs = (tmp_path / "hub" / "models--org--llama" / "blobs").resolve()
    assert _symlink_mounts(snap, "/models/llama-2-7b") == [(str(blobs), "/blobs")]  # the docker runner's
    cfg = SlurmConfig(runtime=runtime, image_dir="/img")
    script = batch_script(cfg, _job(), "ab" * 32, tmp_path / "run", [(snap, "llama-2-7b")], Path("/data"), "n", "c")
    command = script.splitlines()[-1]
    assert f"{blobs}:/blobs:ro" in command and f"{snap}:/models/llama-2-7b:ro" in command


def test_link_mounts_need_no_docker_sdk():
    """The slurm runner borrows the docker runner's `_symlink_mounts`; that import must not need the Docker SDK."""
    code = ("import sys; from pathlib import Path; from llmcbench.driver.runners.slurm_script import link_mounts; "
            "link_mounts([], Path('/data')); assert 'docker' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_local_stage_needs_no_link_mounts(tmp_path):
    """The local runtime's stage links to the snapshot itself: its relative links resolve on the host."""
    snap = _hub_snapshot(tmp_path / "hub")
    script = batch_script(SlurmConfig(), _job(), "ab" * 32, tmp_path / "run", [(snap, "llama-2-7b")], Path("/data"),
                          "n", "c")
    assert "blobs" not in script


def test_local_runtime_identity_is_the_configured_interpreters(tmp_path):
    """slurm.python's own library versions make the environment id (not the driver's), asked once per interpreter."""
    from llmcbench.driver.environment import local_environment_id
    from llmcbench.driver.runners.slurm import SlurmRunner

    calls = tmp_path / "calls"
    python = tmp_path / "other-python"
    want = "local:py3.9:torch=1.13.1,transformers=4.30.0,lm_eval=None,accelerate=None:src=0123456789abcdef"
    python.write_text(f"#!/bin/bash\necho x >> {calls}\necho '{want}'\n")
    python.chmod(0o755)
    runner = SlurmRunner.__new__(SlurmRunner)
    runner.config = SlurmConfig(python=str(python))
    assert runner.environment_id(_job()) == want
    assert runner.environment_id(_job(kind="eval")) == want
    assert calls.read_text().count("x") == 1  # cached per interpreter: planning a matrix stays fast
    runner.config = SlurmConfig()
    assert runner.environment_id(_job()) == local_environment_id()  # no slurm.python: the driver's own


def test_local_runtime_interpreter_that_cannot_answer_is_one_line(tmp_path):
    from llmcbench.driver.errors import UserError
    from llmcbench.driver.runners.slurm import SlurmRunner

    python = tmp_path / "broken-python"
    python.write_text("#!/bin/bash\necho 'ModuleNotFoundError: No module named llmcbench' >&2\nexit 1\n")
    python.chmod(0o755)
    runner = SlurmRunner.__new__(SlurmRunner)
    runner.config = SlurmConfig(python=str(python))
    with pytest.raises(UserError, match="No module named llmcbench"):
        runner.environment_id(_job())


def test_docker_runner_as_root_keeps_the_run_dir_on_an_early_error(tmp_path, monkeypatch):
    """A config error (here a bad LLMCBENCH_DOCKER_SHM_BYTES) must not leave the run dir lent to the
    container's user: the config is built before the run dir is handed over."""
    from types import SimpleNamespace

    from llmcbench.driver.runners import docker as docker_runner

    owners: dict[str, int] = {}
    monkeypatch.setattr(docker_runner.os, "getuid", lambda: 0)
    monkeypatch.setattr(docker_runner.os, "getgid", lambda: 0)
    monkeypatch.setattr(docker_runner.os, "chown", lambda p, uid, gid: owners.__setitem__(str(p), uid))
    monkeypatch.setattr(docker_runner.os, "lchown", lambda p, uid, gid: owners.__setitem__(str(p), uid))
    errors = SimpleNamespace(APIError=OSError, NotFound=OSError)
    monkeypatch.setattr(docker_runner, "docker_sdk", lambda: SimpleNamespace(errors=errors))
    monkeypatch.setenv("LLMCBENCH_DOCKER_SHM_BYTES", "two gigabytes")
    run_dir, model, data = tmp_path / "run", tmp_path / "model", tmp_path / "data"
    for d in (run_dir, model, data):
        d.mkdir()
    runner = docker_runner.DockerRunner(client=object())
    monkeypatch.setattr(runner, "image_for", lambda job: SimpleNamespace(id="sha256:f", tags=["llmcbench/eval:f"]))
    with pytest.raises(ValueError):
        runner.run(_job(kind="eval"), "ab" * 32, run_dir, model, data)
    assert owners.get(str(run_dir), 0) == 0
