"""The slurm runner against a real single-node Slurm cluster (tests/slurm_cluster.py).

The cluster comes up once for this module (munged, slurmctld, slurmd as child processes)
and is stopped by their PIDs at the end. Everything goes through the real CLI: the same
matrix as the local runner with the same metrics, a cancelled job, a job past its Slurm time
limit, a preempted job that is resubmitted, Ctrl-C and `llmcbench cancel`, and bad input
refused before anything is submitted. Without the daemons (or root) the module is skipped
with the reason; CI sets LLMCBENCH_REQUIRE_SLURM=1, which turns that into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcbench.tracks.records import eval_records

sys.path.insert(0, str(Path(__file__).parent))
import slurm_cluster  # noqa: E402

pytestmark = pytest.mark.slurm
FIXTURE_METHODS = Path(__file__).parent / "fixtures" / "methods"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.missing()
    if why:
        if os.environ.get("LLMCBENCH_REQUIRE_SLURM"):
            pytest.fail(f"LLMCBENCH_REQUIRE_SLURM is set but no Slurm cluster can start: {why}")
        pytest.skip(f"no Slurm here: {why}")
    t0 = time.perf_counter()
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm")).start()
    print(f"single-node Slurm cluster up in {time.perf_counter() - t0:.1f} s")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(c.conf)  # the CLI's child processes inherit it
    yield c
    c.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _env(**extra) -> dict:
    return {"LLMCBENCH_METHODS_PATH": str(FIXTURE_METHODS), **extra}


def _summary(runs: Path) -> dict:
    return json.loads((runs / "matrix.json").read_text())


def _queue(cluster) -> dict[str, str]:
    """{job name: state} of what Slurm still has queued or running."""
    out = cluster.run("squeue", "-h", "-o", "%j|%T").stdout
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def _wait_running(cluster, fragment: str, proc=None, timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = [n for n, s in _queue(cluster).items() if fragment in n and s == "RUNNING"]
        if running:
            return running[0]
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver ended before a '{fragment}' job ran: " + proc.stdout.read()[-3000:])
        time.sleep(0.5)
    raise AssertionError(f"no '{fragment}' job ever ran; queue: {_queue(cluster)}")


def _attempts(run_dir: Path) -> list[dict]:
    return json.loads((Path(run_dir) / "slurm.json").read_text())["attempts"]


def _cells(runs: Path) -> dict[str, dict]:
    return {c["preset"] if c["method"] == "hang_inject" else c["method"]: c for c in _summary(runs)["cells"]}


def test_matrix_through_slurm_matches_the_local_runner(cluster, embedded_store, tmp_path, run_cli):
    """Wanda and SparseGPT on the embedded SmolLM2 through Slurm give the local runner's metrics.

    The local store of the bench tests is copied without its two compress cells: the dense
    evaluation (same job, same hash with the local runtime) stays a cache hit, and every
    compress and compressed evaluation runs again as a Slurm job, each with all the node's
    cores as the local runner had them, and must give the local run's weights bit for bit.

    SparseGPT's weight updates carry any rounding of the calibration forward into every later
    block, so this also catches a job whose floats depend on thread timing: two full-suite CI
    runs failed here on MKL VML's first-call race (driver/numerics.py), fixed by the job's warm-up."""
    local, _, _ = embedded_store
    runs = tmp_path / "runs"
    shutil.copytree(local, runs, symlinks=True)
    recomputed = [d for d in runs.iterdir() if d.is_dir() and d.name.startswith(("wanda-", "sparsegpt-"))]
    assert len(recomputed) == 2
    for d in recomputed:
        shutil.rmtree(d)
    (tmp_path / "m.yaml").write_text(f"runner: slurm\nslurm:\n  cpus_per_task: {os.cpu_count()}\n  poll_s: 1\n")
    proc = run_cli("matrix", str(tmp_path / "m.yaml"), "--methods", "wanda,sparsegpt", "--tracks", "1,3,4",
                   "--runs-dir", str(runs), timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = _cells(runs)
    assert cells["wanda"]["status"] == cells["sparsegpt"]["status"] == "done"
    compared = 0
    for cell in cells.values():
        for key, job in cell["jobs"].items():
            slurm_dir = Path(job["run_dir"])
            local_dir = local / slurm_dir.relative_to(runs)
            ours, theirs = (json.loads((d / "result.json").read_text()) for d in (slurm_dir, local_dir))
            if key.startswith("dense"):
                assert job["cached"] and ours["provenance"]["runner"] == "local"
                continue
            assert ours["provenance"]["runner"] == "slurm" and [a["state"] for a in _attempts(slurm_dir)] == ["COMPLETED"]
            assert ours["output_sha256"] == theirs["output_sha256"], key  # the same compressed weights
            if key.startswith("compressed eval"):
                mine = {(r.track, r.metric): r.value for r in eval_records(ours["metrics"], "m", "x", "y")}
                local_values = {(r.track, r.metric): r.value for r in eval_records(theirs["metrics"], "m", "x", "y")}
                assert mine.keys() == local_values.keys()
                for (track, metric), value in local_values.items():
                    if metric != "gpu_memory_gb":  # measured host memory, not a property of the job
                        assert mine[track, metric] == pytest.approx(value, rel=1e-9), (cell["method"], metric)
                        compared += 1
    assert compared >= 2 * 9  # 7 accuracies, ppl, size and MACs per method


def test_cancelled_and_timed_out_cells_fail_alone_and_rerun_alone(cluster, tiny_llama_dir, tmp_path, run_cli):
    runs = tmp_path / "runs"
    (tmp_path / "m.yaml").write_text("runner: slurm\nslurm:\n  time_limit_s: 60\n  poll_s: 1\n")
    args = ["matrix", str(tmp_path / "m.yaml"), "--methods", "hang_inject", "--presets", "ok,timeout,cancel",
            "--models", str(tiny_llama_dir), "--tracks", "3", "--device", "cpu", "--runs-dir", str(runs)]
    cmd = [sys.executable, "-m", "llmcbench.driver.cli", *args]
    env = {**os.environ, "COLUMNS": "200", **_env()}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    victim = _wait_running(cluster, "llmcb-compress-hang_inject", proc)
    # the `cancel` cell's job: the one whose run dir is the cancel cell's
    cancel_dirs = list(runs.glob("hang_inject-cancel-*/*/slurm.json"))
    deadline = time.monotonic() + 120
    while not cancel_dirs and time.monotonic() < deadline:
        time.sleep(0.5)
        cancel_dirs = list(runs.glob("hang_inject-cancel-*/*/slurm.json"))
    job_id = _attempts(cancel_dirs[0].parent)[0]["job_id"]
    log = cancel_dirs[0].with_name("log.txt")
    while not (log.exists() and "hang_inject: sleeping" in log.read_text()):  # cancelled mid-compression
        assert time.monotonic() < deadline, f"{victim}: the cancel cell's job never reached its compression"
        time.sleep(0.5)
    cluster.run("scancel", job_id)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]

    cells = _cells(runs)
    assert cells["ok"]["status"] == "done"
    assert (cells["cancel"]["status"], cells["cancel"]["error_type"]) == ("failed", "cancelled")
    assert (cells["timeout"]["status"], cells["timeout"]["error_type"]) == ("failed", "timeout")
    assert "time limit of 1 min" in cells["timeout"]["message"]
    for key in ("cancel", "timeout"):  # each failed job keeps its log, with what the job printed
        assert "hang_inject: sleeping 600 s" in Path(cells[key]["log"]).read_text()
        assert json.loads(Path(cells[key]["log"]).with_name("result.json").read_text())["status"] == "failed"
    ok_dir = Path(cells["ok"]["jobs"]["compress"]["run_dir"])
    ok_stamp = (ok_dir / "result.json").stat().st_mtime_ns

    # re-run: only the two failed cells are submitted again (and now finish)
    again = run_cli(*args, env=_env(HANG_INJECT_SECONDS="0"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    cells = _cells(runs)
    assert cells["ok"]["status"] == "cached" and (ok_dir / "result.json").stat().st_mtime_ns == ok_stamp
    assert len(_attempts(ok_dir)) == 1
    for key in ("cancel", "timeout"):
        assert cells[key]["status"] == "done"
        attempts = _attempts(Path(cells[key]["jobs"]["compress"]["run_dir"]))
        assert [a["state"] for a in attempts] == ["COMPLETED"]  # a fresh submission (the failed run dir was reset)


def test_preempted_job_is_resubmitted(cluster, tiny_llama_dir, tmp_path, run_cli):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "llmcbench.driver.cli", "matrix", "--methods", "hang_inject", "--presets", "preempt",
           "--models", str(tiny_llama_dir), "--tracks", "3", "--device", "cpu", "--runner", "slurm",
           "--partition", "cpu", "--runs-dir", str(runs)]
    env = {**os.environ, "COLUMNS": "200", **_env(HANG_INJECT_SECONDS="15")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    _wait_running(cluster, "llmcb-compress-hang_inject", proc)
    # a job of the higher-priority partition needs the whole node: Slurm preempts ours
    cluster.run("sbatch", "-p", "urgent", f"--cpus-per-task={os.cpu_count()}", "-o", "/dev/null", "--wrap", "sleep 2")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    cell = _summary(runs)["cells"][0]
    assert cell["status"] == "done"
    run_dir = Path(cell["jobs"]["compress"]["run_dir"])
    assert [a["state"] for a in _attempts(run_dir)] == ["PREEMPTED", "COMPLETED"]
    assert "was preempted: resubmitting" in (run_dir / "log.txt").read_text()


def test_interrupt_and_cancel_leave_nothing_queued(cluster, tiny_llama_dir, tmp_path, run_cli):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "llmcbench.driver.cli", "matrix", "--methods", "hang_inject", "--presets", "cancel",
           "--models", str(tiny_llama_dir), "--tracks", "3", "--device", "cpu", "--runner", "slurm", "--runs-dir", str(runs)]
    env = {**os.environ, "COLUMNS": "200", **_env()}

    # Ctrl-C: the driver cancels what it submitted and exits 130
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    _wait_running(cluster, "hang_inject", proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert not [n for n in _queue(cluster) if "hang_inject" in n]

    # a killed driver cannot clean up: `llmcbench cancel` cancels what this store submitted, nothing else
    other = cluster.run("sbatch", "--parsable", "-o", "/dev/null", "--job-name=not-ours", "--wrap", "sleep 300").stdout.strip()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    _wait_running(cluster, "hang_inject", proc)
    proc.kill()
    proc.wait()
    assert [n for n in _queue(cluster) if "hang_inject" in n]
    res = run_cli("cancel", "--runs-dir", str(runs))
    assert res.returncode == 0 and "cancelled 1 Slurm job" in res.stdout, res.stdout + res.stderr
    deadline = time.monotonic() + 30
    while [n for n in _queue(cluster) if "hang_inject" in n] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [n for n in _queue(cluster) if "hang_inject" in n]
    assert "not-ours" in _queue(cluster)
    shutil.rmtree(runs)  # nothing left and no store: a typo, said so (deleted under its running job, the job ended: CI)
    res = run_cli("cancel", "--runs-dir", str(runs))
    assert res.returncode == 2 and f"store {runs} does not exist and no Slurm job names it" in res.stderr, res.stderr
    cluster.run("scancel", other)


@pytest.mark.parametrize("case, extra, yaml_text, env, needles", [
    ("no sbatch", [], None, {"PATH": "/nonexistent"}, ["sbatch", "PATH"]),
    ("unknown partition", ["--partition", "nope"], None, {}, ["partition 'nope' does not exist", "cpu", "urgent"]),
    ("GPU on a CPU partition", ["--device", "cuda"], None, {}, ["GPUs", "partition 'cpu' has none"]),
    ("unknown slurm key", [], "runner: slurm\nslurm:\n  partitoin: cpu\n", {}, ["slurm.partitoin", "partition"]),
    ("slurm settings without the slurm runner", ["--runner", "local"], "slurm:\n  partition: cpu\n", {}, ["slurm runner"]),
], ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_bad_input_is_one_line_before_anything_is_submitted(case, extra, yaml_text, env, needles, cluster, tiny_llama_dir,
                                                            tmp_path, run_cli, one_line_error):
    runs = tmp_path / "runs"
    args = ["matrix", "--methods", "wanda", "--models", str(tiny_llama_dir), "--tracks", "3", "--runs-dir", str(runs)]
    if yaml_text:
        (tmp_path / "m.yaml").write_text(yaml_text)
        args.insert(1, str(tmp_path / "m.yaml"))
    if "--runner" not in extra and not (yaml_text and "runner:" in yaml_text):
        args += ["--runner", "slurm"]
    if "--device" not in extra:
        args += ["--device", "cpu"]
    before = set(_queue(cluster))
    proc = run_cli(*args, *extra, env=_env(**env))
    one_line_error(proc, *needles)
    assert not runs.exists(), f"{case}: something was written"
    assert not set(_queue(cluster)) - before, f"{case}: something was submitted"  # (an earlier test's job may leave)


def test_doctor_reports_the_cluster(cluster, run_cli):
    proc = run_cli("doctor")
    assert "sbatch" in proc.stdout and "partitions: cpu" in proc.stdout, proc.stdout + proc.stderr
    assert "runner slurm" in proc.stdout
    gone = run_cli("doctor", env={"PATH": "/nonexistent"})
    assert "not on the PATH" in gone.stdout, gone.stdout + gone.stderr
