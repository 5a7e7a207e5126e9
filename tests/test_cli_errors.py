"""Bad input: one line naming the problem, a non-zero exit, nothing half-written in runs/.

These run the real console script in a child process, as a user would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


@pytest.mark.parametrize("args, needles", [
    (["--method", "nosuchmethod"], ["unknown method 'nosuchmethod'", "wanda"]),
    (["--method", "wanda", "--preset", "3:7"], ["unknown preset '3:7'", "unstructured-50"]),
    (["--method", "wanda", "--model", "/no/such/model"], ["/no/such/model", "does not exist"]),
    (["--method", "wanda", "--tracks", "1,9"], ["unknown track 9"]),
    (["--method", "wanda", "--tracks", "1,x"], ["unknown track 'x'"]),
    (["--method", "wanda", "--sparsity", "-0.1"], ["out of range"]),
    (["--method", "wanda", "--sparsity", "150%"], ["out of range"]),
    (["--method", "wanda", "--profile", "fast"], ["unknown profile 'fast'"]),
    # what the user typed is quoted as typed: rich took `[red]` for a style tag and printed 'cuda'
    (["--method", "wanda", "--device", "cuda[red]"], ["unknown device 'cuda[red]'"]),
    # the registry says the reference engines are LLaMA-only: refused before any download
    (["--method", "wanda", "--model", "opt-1.3b"], ["wanda on opt-1.3b", "LLaMA-architecture models only"]),
    (["--method", "llm_pruner", "--model", "opt-1.3b", "--engine", "upstream"], ["llm_pruner does not support OPT"]),
    # what the upstream code hard-codes is refused at planning, not in the job after its run dir
    (["--method", "smoothquant", "--preset", "w4a4", "--engine", "upstream", "--tracks", "2"],
     ["smoothquant w4a4 (upstream engine)", "W8A8 with per-token activations only"]),
    # a track's own options without the track would be read by nothing
    (["--method", "wanda", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "judge"],
     ["--judge-url/--judge-model/--judge-key-env is for track 7", "add 7 to --tracks"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needles, run_cli, one_line_error):
    runs = tmp_path / "runs"
    proc = run_cli("bench", *args, "--runs-dir", str(runs))
    one_line_error(proc, *needles)
    assert proc.returncode == 2
    assert not runs.exists()


@pytest.mark.parametrize("args, needles", [
    (["bench"], ["Missing option '--method'", "bench --help"]),
    (["bench", "--method", "wanda", "--no-such-flag"], ["No such option: --no-such-flag"]),
    (["bench", "--method", "wanda", "--profile"], ["'--profile' requires an argument"]),
    (["benchh"], ["No such command 'benchh'", "Did you mean 'bench'"]),
])
def test_usage_errors_are_one_line_too(tmp_path, args, needles, run_cli, one_line_error):
    """click's own errors: Typer printed a usage line, a hint and a boxed panel (five lines)."""
    proc = run_cli(*args, cwd=tmp_path)
    one_line_error(proc, *needles)
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "runs").exists()


def test_help_and_no_arguments_still_print_the_help(run_cli):
    """The usage-error handler lets help through: no arguments is help with exit 2, as Typer does."""
    proc = run_cli()
    assert proc.returncode == 2 and "bench" in proc.stdout and proc.stderr == "", proc.stderr
    proc = run_cli("bench", "--help")
    assert proc.returncode == 0 and "--method" in proc.stdout and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("args", [["nosuchmethod"], ["wanda", "--preset", "3:7"], ["wanda", "--model", "/no/such/model"]])
def test_parity_bad_input_is_one_line_before_any_progress_display(tmp_path, args, run_cli, one_line_error):
    """Planned before the live job list starts: the error alone, no empty progress line on stdout."""
    runs = tmp_path / "runs"
    proc = run_cli("parity", *args, "--runs-dir", str(runs))
    one_line_error(proc)
    assert proc.returncode == 2 and proc.stdout == "" and not runs.exists()


def test_options_of_a_track_not_run_and_a_data_dir_without_slices_are_one_line(tmp_path, tiny_llama_dir, run_cli,
                                                                                one_line_error):
    runs = tmp_path / "runs"
    evaluate = ["eval", "--model", str(tiny_llama_dir), "--runs-dir", str(runs)]
    proc = run_cli(*evaluate, "--backend", "vllm")
    one_line_error(proc, "--backend is for track 5", "tracks 1,4", "add 5 to --tracks")
    one_line_error(run_cli(*evaluate, "--tracks", "5", "--backend", ","), "--backend names no backend")
    assert proc.stdout == ""  # the job display starts with a job: no blank line left before the error
    one_line_error(run_cli("matrix", "--methods", "wanda", "--tracks", "1", "--judge-url", "http://127.0.0.1:9/v1",
                           "--judge-model", "judge", "--runs-dir", str(runs)), "is for track 7", "add 7 to --tracks")
    empty = tmp_path / "data"
    (empty / "hf" / "allenai__c4" / "en").mkdir(parents=True)  # the layout, no slice in it
    one_line_error(run_cli(*evaluate, "--data-dir", str(empty)), f"data dir {empty} has no slices", "<split>.jsonl")
    assert not runs.exists()


def test_a_misset_environment_device_or_runner_option_is_one_line(tmp_path, run_cli, one_line_error):
    """Each of these was a traceback, an "unknown method", or a message about another runner."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    bench = ["bench", "--method", "wanda", "--runs-dir", str(runs)]
    missing = {"LLMCBENCH_METHODS_PATH": str(tmp_path / "no-such-folder")}
    one_line_error(run_cli(*bench, env=missing), f"LLMCBENCH_METHODS_PATH names {tmp_path / 'no-such-folder'}", "not a folder")
    one_line_error(run_cli("methods", "list", env=missing), "LLMCBENCH_METHODS_PATH names", "not a folder")
    broken = tmp_path / "ext" / "broken"
    broken.mkdir(parents=True)
    (broken / "method.toml").write_bytes(b"\xff\xfe name = 'broken'")  # not UTF-8
    one_line_error(run_cli(*bench, env={"LLMCBENCH_METHODS_PATH": str(tmp_path / "ext")}),
                   f"{broken / 'method.toml'}: invalid method declaration", "utf-8")
    cache.write_text("")
    one_line_error(run_cli(*bench, env={"LLMCBENCH_CACHE": str(cache)}), f"the cache {cache} (LLMCBENCH_CACHE) is a file")
    one_line_error(run_cli(*bench, "--device", "cuda:abc"), "unknown device 'cuda:abc'")
    one_line_error(run_cli(*bench, "--runner", "slurm", "--gpus", "0"), "--gpus applies to the docker runner (got --runner slurm)",
                   "slurm.gpus_per_job")
    one_line_error(run_cli("cancel", "--runs-dir", str(cache)), f"--runs-dir {cache} is a file")
    assert not runs.exists()


def test_paths_and_digests_that_cannot_be_right_are_one_line(tmp_path, run_cli, one_line_error):
    """From a bad-input sweep: a traceback (`~nosuchuser`), a report written before its
    screenshot failed, an empty digest that verified nothing, Slurm's own error for a typo'd store."""
    runs = tmp_path / "runs"
    bench = ["bench", "--method", "wanda", "--runs-dir", str(runs)]
    one_line_error(run_cli(*bench, "--model", "~llmcbench-no-such-user/m"), "'~llmcbench-no-such-user' names no user's home")
    one_line_error(run_cli(*bench, "--data-dir", "~llmcbench-no-such-user/d"), "data dir", "names no user's home")
    for digest in ("", "abc"):
        one_line_error(run_cli("verify", str(tmp_path / "b.tar.gz"), "--expect-digest", digest), "is not a sha256 digest")
    one_line_error(run_cli("cancel", "--runs-dir", str(runs)), f"store {runs} does not exist")
    store = tmp_path / "store"
    store.mkdir()
    one_line_error(run_cli("report", str(store), "--screenshot", str(tmp_path)), "is a folder: name the PNG file")
    (tmp_path / "afile").write_text("")
    one_line_error(run_cli("report", str(store), "--screenshot", str(tmp_path / "afile" / "x.png")), "afile is a file")
    assert list(store.iterdir()) == [] and not runs.exists()


def test_an_empty_cache_variable_is_the_default_cache_not_the_current_folder(monkeypatch, tmp_path):
    """LLMCBENCH_CACHE="" was Path(""): a matrix put 0.5 GB of converted model into the cwd."""
    from llmcbench.driver.fsio import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LLMCBENCH_CACHE", "")
    assert cache_dir() == tmp_path / ".cache" / "llmcbench"
    monkeypatch.setenv("LLMCBENCH_CACHE", "~/elsewhere")
    assert cache_dir() == tmp_path / "elsewhere"


def test_a_store_error_keeps_its_problem_and_its_fix_apart():
    """`eval` names another command's --force: it swaps the fix, the problem stays word for word."""
    import pickle

    from llmcbench.driver.errors import StoreError

    e = StoreError("corrupted result in the store: x")
    assert str(e) == "corrupted result in the store: x; rerun with --force to recompute it"
    assert str(e.with_fix("recompute it with `llmcbench compress --force`")) == (
        "corrupted result in the store: x; recompute it with `llmcbench compress --force`")
    assert str(pickle.loads(pickle.dumps(e))) == str(e)


def test_model_dir_without_config(tmp_path, run_cli, one_line_error):
    model = tmp_path / "not_a_model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"0")
    proc = run_cli("bench", "--method", "wanda", "--model", str(model), "--runs-dir", str(tmp_path / "runs"))
    one_line_error(proc, "no config.json")
    assert not (tmp_path / "runs").exists()
    for text in ("{not json", "[1, 2]"):  # planned, and the job started, before this
        (model / "config.json").write_text(text)
        proc = run_cli("bench", "--method", "wanda", "--model", str(model), "--runs-dir", str(tmp_path / "runs"))
        one_line_error(proc, "config.json", "not a Hugging Face model dir")
        assert not (tmp_path / "runs").exists()


def test_score_rejects_unknown_metric(tmp_path, run_cli, one_line_error):
    csv = tmp_path / "x.csv"
    csv.write_text("track,model,method,setting,metric,value\n1,m,dense,0,mmlu,40\n1,m,wanda,50%,nosuch,30\n")
    one_line_error(run_cli("score", str(csv)), "nosuch", ":3")


def test_score_paper_table(tmp_path, shared_dir, run_cli):
    from llmcbench.tracks.scoring import paper_wide_to_long, write_long_csv

    csv = tmp_path / "t1.csv"
    write_long_csv(paper_wide_to_long(shared_dir / "spec" / "paper" / "table1_track1_performance.csv"), csv)
    proc = run_cli("score", str(csv))
    assert proc.returncode == 0, proc.stderr
    wanda_rows = [line for line in proc.stdout.splitlines() if "Wanda" in line and "50%" in line]
    assert any("om_perf" in r and "86.79" in r for r in wanda_rows), proc.stdout


def test_score_reads_the_papers_wide_table_and_shows_its_printed_oms(shared_dir, run_cli):
    """The paper's own CSV, as shipped: recomputed OMs with the printed ones beside them
    (Table 5's structured row is the scan's misread: 145.22 from its rows, 146.97 printed)."""
    proc = run_cli("score", str(shared_dir / "spec" / "paper" / "table5_track5_acceleration.csv"))
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[4:8]] for line in proc.stdout.splitlines()
            if line.startswith("│") and "om_hard" in line}
    assert rows["structured sparsity"] == ["om_hard", "145.22", "6", "146.97"], proc.stdout
    assert rows["INT8 quantization"][1] == rows["INT8 quantization"][3] == "146.25"


def test_score_names_both_formats_on_a_bad_header(tmp_path, run_cli, one_line_error):
    csv = tmp_path / "x.csv"
    csv.write_text("name,model,setting,mmlu\nWanda,m,50%,30\n")
    one_line_error(run_cli("score", str(csv)), "long format", "wide table")
    csv.write_text("track,model,method,setting,metric,value\n1,m,dense,0,mmlu,40\n")
    one_line_error(run_cli("score", str(csv), "--track", "1"), "--track is for wide tables")
    csv.write_bytes(b"track,model,method,setting,metric,value\n1,m,dense,0,mmlu,40\n\xf0\x28\x8c\x28\n")
    one_line_error(run_cli("score", str(csv)), "not a UTF-8 text CSV")
    one_line_error(run_cli("score", str(tmp_path)), "is not a file")


def test_help_and_methods_list(run_cli):
    assert run_cli("--help").returncode == 0
    proc = run_cli("methods", "list")
    assert proc.returncode == 0
    assert "wanda" in proc.stdout and "2:4" in proc.stdout
    from llmcbench.driver.registry import discover

    for name, spec in discover().items():  # every method with its full pinned commit and both engines
        assert spec.upstream.commit in proc.stdout, name
        assert len(spec.upstream.commit) == 40 and "upstream" in spec.engines, name


def test_corrupted_result_is_detected_not_trusted(tmp_path, tiny_llama_dir, run_cli, one_line_error):
    """A compress-only bench (track 3) on the tiny model, then three kinds of corruption."""
    runs = tmp_path / "runs"
    args = ["bench", "--method", "wanda", "--model", str(tiny_llama_dir), "--tracks", "3", "--runs-dir", str(runs)]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    (result_path,) = runs.glob("*/*/result.json")
    run_dir = result_path.parent
    assert {p.name for p in run_dir.iterdir()} >= {"job.json", "result.json", "log.txt", "model", "report.md", "bench.json"}
    assert (run_dir / "model" / "compression.json").is_file()
    good = result_path.read_text()

    assert "cached" in run_cli(*args).stdout  # untouched store: a cache hit

    result_path.write_text(good[: len(good) // 2])  # truncated
    one_line_error(run_cli(*args), "corrupted result", "--force")

    data = json.loads(good)
    data["compress_s"] = 0.001  # edited figure
    result_path.write_text(json.dumps(data))
    one_line_error(run_cli(*args), "corrupted result", "checksum")

    result_path.write_text(good)
    weights = next((run_dir / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # swapped artifact bytes
    one_line_error(run_cli(*args), "corrupted artifact", weights.name)
    # `eval` never reruns the compress job, so its --force cannot repair it: the line names the command that does
    evaluate = ["eval", "--method", "wanda", "--model", str(tiny_llama_dir), "--tracks", "3", "--runs-dir", str(runs)]
    err = one_line_error(run_cli(*evaluate, "--force"), "corrupted artifact", weights.name,
                         "recompute it with `llmcbench compress --method wanda --preset unstructured-50 --model")
    assert err.endswith(" --force`") and "rerun with --force" not in err

    healed = run_cli(*args, "--force")
    assert healed.returncode == 0, healed.stderr
    assert "cached" in run_cli(*args).stdout


def test_failed_job_keeps_log_and_result(tmp_path, tiny_llama_dir):
    """A job past its time limit is killed; result.json says failed/timeout and the log stays."""
    from llmcbench.driver.bench import compress_job, plan_bench
    from llmcbench.driver.contract import Limits
    from llmcbench.driver.runners.local import LocalRunner
    from llmcbench.driver.store import Store

    plan = plan_bench("wanda", model=str(tiny_llama_dir), tracks="3", runs_dir=tmp_path / "runs")
    job = compress_job(plan).model_copy(update={"limits": Limits(time_limit_s=1)})
    runner = LocalRunner()
    h = job.job_hash(runner.environment_id())
    store = Store(plan.runs_dir)
    run_dir = store.run_dir(plan.cell, h)
    store.prepare(run_dir, job)
    result = runner.run(job, h, run_dir, Path(plan.model.path), plan.data_dir)
    assert result.status == "failed" and result.error.type == "timeout"
    assert (run_dir / "log.txt").is_file()
    assert store.cached(run_dir) is None  # a failed job is not a cache hit: it runs again
    shutil.rmtree(run_dir)


def test_a_job_that_closes_its_output_is_still_held_to_its_time_limit(tmp_path, tiny_llama_dir, monkeypatch):
    """The time limit held only while the job wrote: one that closed stdout and went on (a
    daemonised child, a library closing fd 1) was waited for without end. It is killed at its
    limit like any other, and result.json says timeout."""
    import subprocess
    import sys
    import time

    import llmcbench.driver.runners.local as local
    from llmcbench.driver.bench import compress_job, plan_bench
    from llmcbench.driver.contract import Limits
    from llmcbench.driver.store import Store

    real = subprocess.Popen
    silent = "import os, time; print('started', flush=True); os.close(1); os.close(2); time.sleep(60)"
    monkeypatch.setattr(local.subprocess, "Popen", lambda cmd, **kw: real([sys.executable, "-c", silent], **kw))
    plan = plan_bench("wanda", model=str(tiny_llama_dir), tracks="3", runs_dir=tmp_path / "runs")
    job = compress_job(plan).model_copy(update={"limits": Limits(time_limit_s=2)})
    runner = local.LocalRunner()
    h = job.job_hash(runner.environment_id())
    store = Store(plan.runs_dir)
    run_dir = store.run_dir(plan.cell, h)
    store.prepare(run_dir, job)
    t0 = time.monotonic()
    result = runner.run(job, h, run_dir, Path(plan.model.path), plan.data_dir)
    assert time.monotonic() - t0 < 20
    assert result.status == "failed" and result.error.type == "timeout"
    assert "started" in (run_dir / "log.txt").read_text()


def test_a_cpu_allocation_failure_is_classified_oom_not_crash():
    """torch's CPU allocator fails with a RuntimeError ("DefaultCPUAllocator: can't allocate
    memory"), not a MemoryError; the matrix reports a cell's error class from this."""
    import torch

    from llmcbench.driver.errors import classify_exception

    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**45, dtype=torch.uint8)  # 32 TiB
    assert classify_exception(cpu.value) == "oom", str(cpu.value)
    assert classify_exception(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "oom"
    assert classify_exception(RuntimeError("shape mismatch")) == "crash"


def test_a_full_disk_is_classified_out_of_disk_not_crash(tmp_path):
    """SPEC 9: out of disk is reported as such. The real errors of a full device (/dev/full),
    of safetensors' writer and of an upstream script's log are all `out_of_disk`."""
    import safetensors.torch
    import torch

    from llmcbench.driver.errors import classify_exception
    from llmcbench.methods._upstream.run import _classify_exit

    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 4096)
    assert classify_exception(full.value) == "out_of_disk", str(full.value)
    err = OSError(28, "No space left on device")
    saved = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert classify_exception(err) == classify_exception(saved) == "out_of_disk"
    assert _classify_exit(1, "Traceback ...\nOSError: [Errno 28] No space left on device") == "out_of_disk"
    assert _classify_exit(1, "RuntimeError: shape mismatch") == "crash"
    assert classify_exception(OSError(13, "Permission denied")) == "crash"
    safetensors.torch.save_file({"w": torch.zeros(4)}, tmp_path / "ok.safetensors")  # the writer itself works


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs: a real full disk (needs root and mount; skipped with the reason otherwise)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()[:200]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_out_of_disk_is_one_line_that_says_so(small_disk, tiny_llama_dir, run_cli, one_line_error):
    """The tiny model's weights (13 MB) do not fit an 8 MB disk: the compress job fails as
    out_of_disk, with the free space and the fix, its log and result kept and no partial weights
    left (they hold the room the result needs); with the disk full to the last byte, the
    driver's own first write fails as one line naming the file, not a traceback."""
    runs = small_disk / "runs"
    proc = run_cli("compress", "--method", "wanda", "--model", str(tiny_llama_dir), "--runs-dir", str(runs))
    one_line_error(proc, "compress job failed (out_of_disk:", "No space left on device", f"free at {runs}", "free space there")
    [result] = runs.glob("*/*/result.json")
    record = json.loads(result.read_text())
    assert (record["status"], record["error"]["type"]) == ("failed", "out_of_disk")
    assert (result.parent / "log.txt").is_file()
    assert sorted(p.name for p in result.parent.iterdir()) == ["job.json", "log.txt", "result.json"]

    shutil.rmtree(runs)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    proc = run_cli("compress", "--method", "wanda", "--model", str(tiny_llama_dir), "--runs-dir", str(runs))
    assert proc.returncode == 1
    one_line_error(proc, "No space left on device", "job.json", "out of disk (", "free space there")
    assert not list(runs.glob("*/*/*.json"))


def test_a_runs_dir_that_is_a_file_is_one_line(tmp_path, run_cli, one_line_error):
    afile = tmp_path / "afile"
    afile.write_text("not a store\n")
    for command in (["bench", "--method", "wanda"], ["matrix", "--methods", "wanda"]):
        proc = run_cli(*command, "--runs-dir", str(afile))
        one_line_error(proc, "is a file", "directory")
        assert proc.returncode == 2 and afile.read_text() == "not a store\n"
        proc = run_cli(*command, "--runs-dir", str(afile / "runs"))  # below a file: mkdir's traceback before
        one_line_error(proc, "cannot be created", f"{afile} is a file")
        assert proc.returncode == 2 and afile.read_text() == "not a store\n"


def test_a_store_that_cannot_be_written_is_one_line(tmp_path, tiny_llama_dir, run_cli, one_line_error):
    """Another user's store or a read-only mount fails where the first job's lock is made; here
    the lock folder's place is taken by a file (root may write anywhere else)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / ".locks").write_text("")
    proc = run_cli("bench", "--method", "wanda", "--model", str(tiny_llama_dir), "--runs-dir", str(runs), "--device", "cpu")
    one_line_error(proc, f"the result store {runs} cannot be written", "--runs-dir")
    assert proc.returncode == 2 and sorted(p.name for p in runs.iterdir()) == [".locks"]


def test_an_empty_track_list_is_one_line(tiny_llama_dir, tmp_path, run_cli, one_line_error):
    for tracks in (",,,", " , "):
        proc = run_cli("bench", "--method", "wanda", "--model", str(tiny_llama_dir), "--tracks", tracks,
                       "--runs-dir", str(tmp_path / "runs"))
        one_line_error(proc, "no track in", "TRACKS=1,3,4")
        assert proc.returncode == 2 and not (tmp_path / "runs").exists()


def test_remote_code_is_an_opt_in_every_command_offers(tmp_path, tiny_llama_dir, run_cli, one_line_error):
    """The refusal says to pass --trust-remote-code: bench, deploy and parity take it (only
    matrix did, so following the message gave 'No such option'); a local dir whose config maps
    its classes to its own code (auto_map) is refused without it, before a job starts."""
    for command in ("bench", "deploy", "parity"):
        assert "--trust-remote-code" in run_cli(command, "--help").stdout, command
    glm = tmp_path / "glm"
    shutil.copytree(tiny_llama_dir, glm)
    config = json.loads((glm / "config.json").read_text())
    (glm / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "configuration_glm.GLMConfig"}}))
    runs = tmp_path / "runs"
    proc = run_cli("bench", "--method", "wanda", "--model", str(glm), "--runs-dir", str(runs))
    one_line_error(proc, "runs its own modelling code", "--trust-remote-code")
    assert proc.returncode == 2 and not runs.exists()


def test_a_matrix_that_selects_no_cell_says_why(tmp_path, run_cli, one_line_error):
    """--presets track2 runs track 2 only; without track 2 among the tracks the matrix ran
    nothing, printed "0 cells" and exited 0."""
    proc = run_cli("matrix", "--methods", "gptq,awq", "--presets", "track2", "--runs-dir", str(tmp_path / "runs"))
    one_line_error(proc, "no cells to run", "add 2 to --tracks")
    assert proc.returncode == 2


def test_an_interrupted_bench_says_what_is_kept_and_leaves_no_job_running(tmp_path, tiny_llama_dir):
    """Ctrl-C while a job runs: exit 130 and the line saying finished jobs are kept (Typer turned
    the interrupt into a silent exit 130 before the command said it), the job process gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    runs = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HANG_INJECT_SECONDS": "600",
           "LLMCBENCH_METHODS_PATH": str(Path(__file__).parent / "fixtures" / "methods")}
    proc = subprocess.Popen([sys.executable, "-m", "llmcbench.driver.cli", "bench", "--method", "hang_inject", "--preset", "ok",
                             "--model", str(tiny_llama_dir), "--tracks", "3", "--device", "cpu", "--runs-dir", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline, log = time.monotonic() + 300, None
    while time.monotonic() < deadline and proc.poll() is None and log is None:
        log = next((p for p in runs.glob("hang_inject-*/*/log.txt") if "sleeping" in p.read_text()), None)
        time.sleep(0.2)
    assert log is not None, "the job never started sleeping"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert err.strip() == "interrupted: finished jobs are kept in the store; run the same command to resume", err
    assert log.parent.name not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
