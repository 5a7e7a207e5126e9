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
