"""`llmcbench matrix` and the model registry: planning, bad input, failure isolation, resume.

The matrix runs through the real CLI in a child process (local runner, real jobs) on the tiny
random LLaMA; a deliberately failing method (tests/fixtures/methods/oom_inject, found through
LLMCBENCH_METHODS_PATH) runs out of memory inside its job. The embedded model's matrix reads
the session's embedded store (Wanda and SparseGPT benches) and must find every cell cached.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmcbench.driver.matrix import parse_spec, plan_matrix, refresh_cached, run_matrix, write_summary
from llmcbench.driver.model_registry import load_registry
from llmcbench.driver.registry import discover
from llmcbench.tracks.scoring import MetricRecord, score

FAILING_METHODS = Path(__file__).parent / "fixtures" / "methods"
PAPER_TRACK2_MODELS = {"llama-7b", "llama-13b", "llama-30b", "llama-65b", "llama-2-7b", "llama-2-13b", "llama-2-70b",
                       "llama-3-8b", "llama-3-70b", "vicuna-7b", "vicuna-13b", "opt-1.3b", "opt-2.7b", "opt-6.7b",
                       "opt-13b", "opt-30b", "chatglm2-6b", "chatglm3-6b"}


# ---------------------------------------------------------------- registry


def test_registry_holds_the_papers_models_with_access_rules():
    reg = load_registry()
    paper = {n for n, m in reg.items() if 2 in m.tracks and not m.embedded}
    assert paper == PAPER_TRACK2_MODELS
    assert {n for n, m in reg.items() if m.embedded} == {"smollm2-135m-instruct"}
    assert {n for n, m in reg.items() if m.gated} == {n for n, m in reg.items() if m.hub_id.startswith("meta-llama/")}
    assert len([m for m in reg.values() if m.gated]) == 5  # LLaMA-2 7/13/70B, LLaMA-3 8/70B
    assert {n for n, m in reg.items() if m.trust_remote_code} == {"chatglm2-6b", "chatglm3-6b"}
    assert {n for n, m in reg.items() if 1 in m.tracks} == {"smollm2-135m-instruct", "llama-2-7b", "llama-3-8b", "vicuna-7b"}
    methods = set(discover())
    for m in reg.values():
        assert set(m.methods) <= methods, m.name
        assert m.revision == "" or (len(m.revision) == 40 and int(m.revision, 16) >= 0), m.name
    # LLM-Pruner has no OPT support upstream; the reference engines run LLaMA-architecture models only
    assert "llm_pruner" not in reg["opt-1.3b"].methods
    assert reg["opt-1.3b"].supports("wanda", "reference") and reg["opt-1.3b"].supports("awq", "upstream") is None
    assert reg["llama-2-7b"].supports("omniquant", "reference") is None


def test_models_list_cli(run_cli):
    proc = run_cli("models", "list")
    assert proc.returncode == 0, proc.stderr
    for name in PAPER_TRACK2_MODELS | {"meta-llama/Llama-2-7b-hf", "THUDM/chatglm3-6b"}:
        assert name in proc.stdout, name


def test_matrix_help_names_every_key_a_matrix_file_takes():
    """The FILE argument's help is where a user reads the keys; it had left out `backends`."""
    import inspect

    from llmcbench.driver.cli import matrix
    from llmcbench.driver.matrix import MatrixSpec

    text = inspect.signature(matrix).parameters["file"].default.help
    listed = {k.strip() for k in text.split("keys:")[1].rstrip(")").split(",")}
    assert listed == set(MatrixSpec.model_fields), listed ^ set(MatrixSpec.model_fields)


def test_tables_keep_their_width_when_piped():
    """Piped into a log (tee, a Slurm job, CI) without COLUMNS, rich would assume 80 columns and
    wrap the registry's nine columns cell by cell; the CLI prints a table at its natural width
    there (driver/consoles.py): one line per model, its hub id, revision and family on it."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-m", "llmcbench.driver.cli", "models", "list"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for m in load_registry().values():
        rows = [ln for ln in lines if f"│ {m.hub_id} " in ln]
        assert len(rows) == 1 and f"│ {m.revision[:10] or '-'} " in rows[0] and f"│ {m.family} " in rows[0], (m.name, rows)
    assert max(map(len, lines)) > 120


# ---------------------------------------------------------------- planning


def test_track2_presets_follow_the_paper():
    specs = discover()
    assert specs["gptq"].presets_for("track2") == ["w4a16-g128"] == specs["awq"].presets_for("track2")
    assert specs["smoothquant"].presets_for("track2") == ["w4a4"] == specs["omniquant"].presets_for("track2")
    for m in ("wanda", "sparsegpt", "llm_pruner"):
        assert specs[m].presets_for("track2") == specs[m].presets_for("paper")


def test_plan_matrix_cells(tmp_path, tiny_llama_dir):
    spec = parse_spec({"methods": ["gptq", "wanda"], "presets": ["paper", "track2"], "models": [str(tiny_llama_dir)],
                       "tracks": "2,3,4", "device": "cpu"})
    m = plan_matrix(spec, tmp_path / "runs")
    cells = {(c.method, c.preset): c.tracks for c in m.cells}
    # the paper's W8 preset gets every track; the track-2 preset (W4A16 g128) only track 2
    assert cells == {("gptq", "w8a16"): [2, 3, 4], ("gptq", "w4a16-g128"): [2], ("wanda", "unstructured-50"): [2, 3, 4]}
    assert m.workers == 1
    assert not (tmp_path / "runs").exists()  # planning writes nothing


def test_a_cell_named_twice_is_planned_once(tmp_path, tiny_llama_dir):
    """A model or method listed twice, or one model under two names (a path with and without a
    trailing slash resolve to one model dir): one cell each, not two benches of the same jobs."""
    spec = parse_spec({"methods": ["wanda", "gptq", "wanda"], "models": [str(tiny_llama_dir), str(tiny_llama_dir) + "/", str(tiny_llama_dir)],
                       "tracks": "3", "device": "cpu"})
    m = plan_matrix(spec, tmp_path / "runs")
    assert sorted((c.method, c.preset) for c in m.cells) == [("gptq", "w8a16"), ("wanda", "unstructured-50")]


def test_unsupported_architecture_is_recorded_not_run(tmp_path):
    spec = parse_spec({"methods": ["llm_pruner", "wanda"], "models": ["opt-1.3b"], "tracks": "2"})
    m = plan_matrix(spec, tmp_path / "runs")  # no hub access needed: neither cell can run here
    assert [(c.method, c.status, c.error_type) for c in m.cells] == [("llm_pruner", "unsupported", "unsupported"),
                                                                     ("wanda", "unsupported", "unsupported")]
    assert "OPT" in m.cells[0].message and "LLaMA-architecture" in m.cells[1].message


def test_om_gen_is_the_rms_over_models():
    ppl = {"a": (10.0, 12.0), "b": (20.0, 25.0), "c": (5.0, 5.5)}
    records = [MetricRecord(track=2, model=k, method="dense", setting="dense", metric="wikitext2_ppl", value=d) for k, (d, _) in ppl.items()]
    records += [MetricRecord(track=2, model=k, method="wanda", setting="50%", metric="wikitext2_ppl", value=c) for k, (_, c) in ppl.items()]
    records += [MetricRecord(track=2, model="a", method="gptq", setting="w4", metric="wikitext2_ppl", value=11.0)]
    rows = {(r.method, r.om): r for r in score(records)}
    expected = 100 * math.sqrt(sum((d / c) ** 2 for d, c in ppl.values()) / 3)
    assert rows["wanda", "om_gen"].value == pytest.approx(expected, rel=1e-12)
    assert rows["wanda", "om_gen"].n_cells == 3
    assert ("gptq", "om_gen") not in rows  # a method missing models is not ranked on fewer cells


# ---------------------------------------------------------------- bad input


def _gated_env(tmp_path):
    home = tmp_path / "hf_home"
    home.mkdir()
    return {"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "", "HF_HOME": str(home), "HF_TOKEN_PATH": str(home / "token")}


def test_a_matrix_file_may_use_anchors_and_merge_keys(tmp_path):
    """The duplicate-key check reads plain keys only: a merge key (<<) is YAML's, not a repeat."""
    from llmcbench.driver.matrix import load_matrix_file

    f = tmp_path / "m.yaml"
    f.write_text("methods: &m [wanda]\nmodels: [embedded]\nrunner: slurm\nslurm:\n  <<: {partition: gpu, account: x}\n"
                 "  account: lab\ntracks: ['1', 3]\n")
    spec = parse_spec(load_matrix_file(f))
    assert (spec.methods, spec.slurm.partition, spec.slurm.account, spec.tracks) == (["wanda"], "gpu", "lab", [1, 3])


@pytest.mark.parametrize("case, needles", [
    ("unknown_key", ["unknown key 'modles'", "known keys"]),
    ("unknown_model", ["unknown model 'no-such-model'", "models list"]),
    ("gated", ["llama-2-7b", "is gated", "HF_TOKEN"]),
    ("remote_code", ["chatglm2-6b", "--trust-remote-code"]),
    ("unknown_preset", ["unknown preset 'w2a2'", "gptq"]),
    ("no_methods", ["no methods"]),
    ("bad_yaml", ["not valid YAML"]),
    ("judge_key", ["unknown key 'judge.modle'", "base_url"]),
    ("judge_url", ["--judge-url", "http://"]),
    ("judge_key_unset", ["LLMCB_NO_SUCH_KEY", "is not set"]),  # before any job, not after all of them
    ("misspelt_methods", ["unknown key 'method'", "known keys"]),
    ("not_utf8", ["not UTF-8"]),
    ("directory", ["is a directory"]),
    # each was taken quietly: the last `methods:` list, track 1, the embedded model
    ("twice", ["key 'methods' appears twice, line 2"]),
    ("true_track", ["tracks: tracks are numbers 1-7, not true/false"]),
    ("empty_model", ["models: give at least one name"]),
    ("no_models", ["models: give at least one name"]),
])
def test_matrix_bad_input_is_one_line(case, needles, tmp_path, run_cli, one_line_error):
    runs = tmp_path / "runs"
    f = tmp_path / "m.yaml"
    args, env = ["matrix", "--runs-dir", str(runs)], None
    if case == "unknown_key":
        f.write_text("methods: [wanda]\nmodles: [embedded]\n")
        args.insert(1, str(f))
    elif case == "unknown_model":
        args += ["--methods", "wanda", "--models", "no-such-model"]
    elif case == "gated":
        args += ["--methods", "wanda", "--models", "embedded,llama-2-7b"]
        env = _gated_env(tmp_path)
    elif case == "remote_code":
        args += ["--methods", "llm_pruner", "--models", "chatglm2-6b"]
    elif case == "unknown_preset":
        args += ["--methods", "gptq", "--presets", "w2a2"]
    elif case == "bad_yaml":
        f.write_text("methods: [wanda\n")
        args.insert(1, str(f))
    elif case == "judge_key":
        f.write_text("methods: [wanda]\njudge:\n  base_url: http://127.0.0.1:9/v1\n  modle: gpt-4\n")
        args.insert(1, str(f))
    elif case == "judge_url":
        args += ["--methods", "wanda", "--judge-url", "127.0.0.1:8000/v1", "--judge-model", "gpt-4"]
    elif case == "judge_key_unset":
        args += ["--methods", "wanda", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "gpt-4",
                 "--judge-key-env", "LLMCB_NO_SUCH_KEY"]
    elif case == "misspelt_methods":  # the misspelt key explains the missing methods, not "pass --methods"
        f.write_text("method: [wanda]\n")
        args.insert(1, str(f))
    elif case == "not_utf8":
        f.write_bytes(b"methods: [wanda]\n# caf\xe9 (latin-1)\n")
        args.insert(1, str(f))
    elif case == "directory":
        args.insert(1, str(tmp_path))
    elif case in ("twice", "true_track", "empty_model"):
        f.write_text({"twice": "methods: [wanda]\nmethods: [gptq]\n", "true_track": "methods: [wanda]\ntracks: [true]\n",
                      "empty_model": "methods: [wanda]\nmodels: ['']\n"}[case])
        args.insert(1, str(f))
    elif case == "no_models":
        args += ["--methods", "wanda", "--models="]
    proc = run_cli(*args, env=env)
    one_line_error(proc, *needles)
    assert proc.returncode == 2
    assert not runs.exists()


# ---------------------------------------------------------------- running


def _matrix_env():
    return {"LLMCBENCH_METHODS_PATH": str(FAILING_METHODS)}


def _summary(runs: Path) -> dict:
    return json.loads((runs / "matrix.json").read_text())


def test_failed_cell_is_isolated_recorded_and_rerun_alone(tmp_path, tiny_llama_dir, run_cli):
    runs = tmp_path / "runs"
    args = ["matrix", "--methods", "wanda,oom_inject,sparsegpt", "--models", str(tiny_llama_dir), "--tracks", "2,3,4",
            "--device", "cpu", "--runs-dir", str(runs)]
    proc = run_cli(*args, env=_matrix_env())
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = {c["method"]: c for c in _summary(runs)["cells"]}
    assert cells["wanda"]["status"] == cells["sparsegpt"]["status"] == "done"
    failed = cells["oom_inject"]
    assert failed["status"] == "failed" and failed["error_type"] == "oom"
    assert "OutOfMemoryError" in Path(failed["log"]).read_text()  # the failed job keeps its log
    board = {(r["method"], r["om"]): r["value"] for r in _summary(runs)["leaderboard"]}
    for method in ("wanda", "sparsegpt"):
        for om in ("om_gen", "om_train", "om_inf"):
            assert math.isfinite(board[method, om]), (method, om)
    assert not any(m == "oom_inject" for m, _ in board)
    assert "oom_inject" in proc.stdout and "1 failed" in proc.stdout

    # the report lists the failed cell with its error class
    rep = run_cli("report", str(runs), "-o", str(tmp_path / "report"))
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "failed" in md and "oom: OutOfMemoryError" in md

    ok_results = {m: {k: Path(j["run_dir"], "result.json").stat().st_mtime_ns for k, j in cells[m]["jobs"].items()}
                  for m in ("wanda", "sparsegpt")}
    again = run_cli(*args, env=_matrix_env())
    assert again.returncode == 1
    cells2 = {c["method"]: c for c in _summary(runs)["cells"]}
    assert cells2["wanda"]["status"] == cells2["sparsegpt"]["status"] == "cached"
    assert cells2["oom_inject"]["status"] == "failed"  # only the failed cell ran again
    for m, stamps in ok_results.items():
        for k, j in cells2[m]["jobs"].items():
            assert j["cached"] and Path(j["run_dir"], "result.json").stat().st_mtime_ns == stamps[k], (m, k)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_matrix_resumes_with_the_missing_cells_only(sig, tmp_path, tiny_llama_dir):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "llmcbench.driver.cli", "matrix", "--methods", "wanda,sparsegpt", "--models",
           str(tiny_llama_dir), "--tracks", "3", "--device", "cpu", "--runs-dir", str(runs)]
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # wait until the second cell's compress job is running (its run dir has a job.json, no result)
    deadline = time.monotonic() + 600
    started = []
    while time.monotonic() < deadline and proc.poll() is None:
        started = [p for p in runs.glob("sparsegpt-*/*/job.json") if not (p.parent / "result.json").exists()]
        if started:
            break
        time.sleep(0.2)
    assert started, "the matrix never reached its second cell"
    time.sleep(1.0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "interrupted" in err
    run_dir = started[0].parent
    assert not (run_dir / "result.json").exists() or json.loads((run_dir / "result.json").read_text())["status"] == "failed"
    # no job process survived the driver (the local runner kills its process groups)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run_dir.name) not in ps

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    cells = {c["method"]: c for c in _summary(runs)["cells"]}
    assert cells["wanda"]["status"] == "cached"  # finished before the interrupt: not run again
    assert cells["sparsegpt"]["status"] == "done"


def test_embedded_matrix_reuses_the_bench_store(embedded_store, run_cli):
    """The matrix over the embedded model's Wanda and SparseGPT finds every job in the store the
    benches filled, and ranks them with the same OMs the bench reports printed."""
    runs, _, _ = embedded_store
    proc = run_cli("matrix", "--methods", "wanda,sparsegpt", "--tracks", "1,3,4", "--runs-dir", "runs", cwd=runs.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _summary(runs)
    assert [c["status"] for c in summary["cells"]] == ["cached", "cached"]
    board = {(r["method"], r["om"]): r["value"] for r in summary["leaderboard"]}
    for cell in summary["cells"]:
        bench = json.loads(Path(cell["jobs"]["compress"]["run_dir"], "bench.json").read_text())
        for om in bench["oms"]:
            if om["track"] != 3:  # track 3's baseline is the largest among the compared methods: the matrix compares both
                assert board[cell["method"], om["om"]] == pytest.approx(om["value"], rel=1e-9), (cell["method"], om["om"])
    # 50% of the block linears pruned: effective MACs fall, size and memory do not grow
    assert board["wanda", "om_inf"] > 100 and board["sparsegpt", "om_inf"] > 100
    assert all(math.isfinite(board[m, "om_perf"]) for m in ("wanda", "sparsegpt"))


def test_parallel_cells_share_one_dense_evaluation(tmp_path, tiny_llama_dir, run_cli):
    """`--jobs 2` (one worker per GPU on a multi-GPU machine): both cells run at once, and the
    dense evaluation they share runs once, the other worker waiting for its cached result."""
    runs = tmp_path / "runs"
    proc = run_cli("matrix", "--methods", "wanda,sparsegpt", "--models", str(tiny_llama_dir), "--tracks", "2",
                   "--device", "cpu", "--jobs", "2", "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 in parallel" in proc.stdout
    cells = _summary(runs)["cells"]
    assert [c["status"] for c in cells] == ["done", "done"]
    dense = {c["jobs"]["dense eval"]["run_dir"] for c in cells}
    assert len(dense) == 1 and len(list(runs.glob("dense-*/*/result.json"))) == 1
    assert sum(not c["jobs"]["dense eval"]["cached"] for c in cells) == 1


# ---------------------------------------------------------------- interrupts, --force, runner errors (fake jobs)

# Stands in for `python -m llmcbench.driver.jobrun` (same arguments): logs "<kind> <method>" to
# $FAKE_JOB_LOG, sleeps $FAKE_JOB_SLEEP_<KIND> s and writes an ok result, so the matrix's own
# logic (threads, locks, store, force) runs for real in a second instead of minutes of models.
FAKE_JOB = """
import os, sys, time
from pathlib import Path
from llmcbench.driver.contract import Job, Result, read_record
from llmcbench.driver.fsio import write_record
a = sys.argv
job = read_record(Path(a[a.index("--job") + 1]), Job)
out = Path(a[a.index("--out") + 1])
with open(os.environ["FAKE_JOB_LOG"], "a") as f:
    f.write(f"{job.kind} {job.method}\\n")
time.sleep(float(os.environ.get("FAKE_JOB_SLEEP_" + job.kind.upper(), "0")))
if job.kind == "compress":
    (out / "model").mkdir(exist_ok=True)
write_record(out / "result.json", Result(job_hash=os.environ["LLMCBENCH_JOB_HASH"], status="ok", started_at="x",
                                         finished_at="y", wall_s=0.0).sealed())
"""


@pytest.fixture
def fake_jobs(monkeypatch, tmp_path):
    """The local runner starts FAKE_JOB instead of the job process; returns the jobs run so far."""
    import llmcbench.driver.runners.local as local
    from llmcbench.driver.runners import reset_stopping

    real = subprocess.Popen

    def popen(cmd, **kw):
        if "llmcbench.driver.jobrun" in cmd:
            cmd = [sys.executable, "-c", FAKE_JOB, *cmd[3:]]
        return real(cmd, **kw)

    monkeypatch.setattr(local.subprocess, "Popen", popen)
    ran = tmp_path / "ran.txt"
    monkeypatch.setenv("FAKE_JOB_LOG", str(ran))
    yield lambda: ran.read_text().splitlines() if ran.exists() else []
    reset_stopping()  # a test that interrupted leaves the next one free to run jobs


def _fake_matrix(tmp_path, model_dir, jobs=1):
    """Two cells sharing one dense evaluation (track 2 only: compress, dense eval, compressed eval)."""
    spec = parse_spec({"methods": ["wanda", "sparsegpt"], "models": [str(model_dir)], "tracks": "2", "device": "cpu",
                       "jobs": jobs})
    return plan_matrix(spec, tmp_path / "runs")


def _results(runs: Path) -> dict[str, str]:
    return {str(p.parent): json.loads(p.read_text())["status"] for p in runs.glob("*/*/result.json")}


def test_ctrl_c_on_parallel_matrix_records_interrupted_and_starts_nothing(tmp_path, tiny_llama_dir, fake_jobs, monkeypatch):
    """Ctrl-C while one worker runs the shared dense evaluation and the other waits for it: the
    killed job is interrupted, not `oom` (no failed result sealed in the store), the waiting
    worker does not start it again, and running the same matrix again finishes it."""
    monkeypatch.setenv("FAKE_JOB_SLEEP_EVAL", "6")
    m = _fake_matrix(tmp_path, tiny_llama_dir, jobs=2)
    sent = []

    def interrupt_once_dense_runs():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "eval dense" not in fake_jobs():
            time.sleep(0.05)
        if "eval dense" in fake_jobs():  # else the matrix failed early: no stray SIGINT for pytest
            time.sleep(0.3)
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_dense_runs, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_matrix(m)
    assert sent and time.monotonic() - sent[0] < 4  # the other worker did not run the 6 s dense eval again
    assert fake_jobs().count("eval dense") == 1
    assert [(c.status, c.error_type) for c in m.cells] == [("failed", "interrupted")] * 2
    results = _results(tmp_path / "runs")
    assert set(results.values()) == {"ok"}, results  # the compress jobs; nothing sealed failed
    assert not list((tmp_path / "runs").glob("dense-*/*/result.json"))
    # the killed job's log is kept: the waiting worker, refused, did not prepare its run dir afresh
    logs = [p.read_text() for p in (tmp_path / "runs").glob("dense-*/*/log.txt")]
    assert len(logs) == 1 and "the driver was interrupted" in logs[0], logs
    write_summary(m, [])
    assert {c["error_type"] for c in _summary(tmp_path / "runs")["cells"]} == {"interrupted"}

    monkeypatch.setenv("FAKE_JOB_SLEEP_EVAL", "0")  # resume: only the missing jobs run
    again = run_matrix(_fake_matrix(tmp_path, tiny_llama_dir, jobs=2))
    assert [c.status for c in again.cells] == ["done", "done"]
    assert fake_jobs().count("eval dense") == 2 and fake_jobs().count("compress wanda") == 1


class _FakeContainer:
    """A container that runs until it is killed or removed (no daemon needed)."""

    def __init__(self):
        self.id, self.attrs, self.gone, self.removed = "fakecontainer", {}, threading.Event(), []

    def start(self):
        pass

    def logs(self, **kw):
        self.gone.wait(60)
        yield from ()

    def wait(self, timeout=None):
        import requests

        if not self.gone.wait(timeout):
            raise requests.exceptions.ReadTimeout("wait timed out")
        return {"StatusCode": 137}

    def kill(self):
        self.gone.set()

    def remove(self, force=False):
        self.removed.append(force)
        self.gone.set()

    def reload(self):
        import docker

        raise docker.errors.NotFound("removed")


def test_interrupt_removes_docker_containers(tmp_path, tiny_llama_dir, data_dir):
    """terminate_all force-removes the running job containers: the worker thread blocked in
    container.wait() returns, reports the job interrupted (no result.json), and a runner asked
    for another job afterwards starts no container."""
    from llmcbench.driver.bench import compress_job
    from llmcbench.driver.runners import reset_stopping, terminate_all
    from llmcbench.driver.runners.docker import DockerRunner

    container, created = _FakeContainer(), threading.Event()

    def create(**cfg):
        assert cfg["labels"]["org.llmcbench.job_hash"] == "h" * 64
        created.set()
        return container

    runner = DockerRunner(client=SimpleNamespace(containers=SimpleNamespace(create=create, list=lambda **_: [])))
    runner.image_for = lambda job: SimpleNamespace(id="sha256:fake", tags=["llmcbench-eval:fake"])
    runner.container_user = lambda: (os.getuid(), os.getgid(), [])
    job = compress_job(_fake_matrix(tmp_path, tiny_llama_dir).cells[0].plan)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    outcome = []

    def run():
        try:
            outcome.append(runner.run(job, "h" * 64, run_dir, tiny_llama_dir, data_dir))
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        assert created.wait(30)
        terminate_all()
        worker.join(10)
        assert not worker.is_alive(), "the worker still waits for its container"
        assert container.removed and container.removed[0] is True
        assert isinstance(outcome[0], KeyboardInterrupt), outcome
        assert not (run_dir / "result.json").exists()
        created.clear()
        with pytest.raises(KeyboardInterrupt):
            runner.run(job, "h" * 64, run_dir, tiny_llama_dir, data_dir)
        assert not created.is_set()
    finally:
        container.gone.set()
        reset_stopping()


def test_corrupted_result_fails_its_cell_only_and_force_repairs_it(tmp_path, tiny_llama_dir, fake_jobs):
    """A corrupted result is the store's error for its own cell, not an abort of the matrix while
    checking the cache; `--force` (refresh_cached skips the store then) recomputes it."""
    from llmcbench.driver.store import Store

    from llmcbench.driver.bench import planned_jobs

    m = run_matrix(_fake_matrix(tmp_path, tiny_llama_dir))
    compress_dir = planned_jobs(m.cells[0].plan)[0].run_dir  # wanda's own job, not the shared dense eval
    (compress_dir / "result.json").write_text('{"status": "ok", "trunc')

    m = _fake_matrix(tmp_path, tiny_llama_dir)
    refresh_cached(m)
    assert [c.status for c in m.cells] == ["planned", "cached"]
    run_matrix(m)
    assert (m.cells[0].status, m.cells[0].error_type) == ("failed", "bad_input") and "corrupted" in m.cells[0].message
    assert m.cells[1].status == "cached"

    m = _fake_matrix(tmp_path, tiny_llama_dir)
    refresh_cached(m, force=True)
    run_matrix(m, force=True)
    assert [c.status for c in m.cells] == ["done", "done"]
    assert Store(tmp_path / "runs").cached(compress_dir) is not None


@pytest.mark.parametrize("jobs", [1, 2])
def test_force_runs_the_shared_dense_evaluation_once(jobs, tmp_path, tiny_llama_dir, fake_jobs):
    """`--force` recomputes every job once: the dense evaluation both cells share is not
    deleted and rerun by the second cell after the first recomputed it."""
    run_matrix(_fake_matrix(tmp_path, tiny_llama_dir, jobs))
    before = len(fake_jobs())
    m = run_matrix(_fake_matrix(tmp_path, tiny_llama_dir, jobs), force=True)
    assert [c.status for c in m.cells] == ["done", "done"]
    assert sorted(fake_jobs()[before:]) == ["compress sparsegpt", "compress wanda", "eval dense", "eval sparsegpt",
                                            "eval wanda"]
    assert set(_results(tmp_path / "runs").values()) == {"ok"}


def test_runner_that_cannot_start_fails_its_cell_only(tmp_path, tiny_llama_dir, monkeypatch):
    """A parallel worker's runner that cannot be created (no Docker daemon) fails its cell and the
    matrix goes on; CPU jobs in Docker are not given GPUs (no NVIDIA runtime demanded)."""
    from llmcbench.driver.errors import UserError

    asked = []

    class NoDaemon:
        def __init__(self, gpus=None, client=None):
            asked.append(gpus)
            raise UserError("the Docker daemon is not reachable (test)")

    monkeypatch.setattr("llmcbench.driver.runners.docker.DockerRunner", NoDaemon)
    m = _fake_matrix(tmp_path, tiny_llama_dir, jobs=2)
    for c in m.cells:
        c.plan.runner_name = "docker"  # as if planned with --runner docker while the daemon was up
    run_matrix(m)
    assert [(c.status, c.error_type) for c in m.cells] == [("failed", "bad_input")] * 2
    assert all("not reachable" in c.message for c in m.cells)
    assert asked and all(g is None for g in asked)


def test_matrix_cli_user_error_is_one_line_with_the_summary(tmp_path, tiny_llama_dir, monkeypatch):
    """An error the cells did not isolate ends the matrix with one line (exit 2), not a
    traceback, and matrix.json still records the cells."""
    from typer.testing import CliRunner

    import llmcbench.driver.matrix as matrix_module
    from llmcbench.driver.cli import app
    from llmcbench.driver.errors import UserError

    def broken(*a, **kw):
        raise UserError("the runner broke (test)")

    monkeypatch.setattr(matrix_module, "run_matrix", broken)
    sigterm = signal.getsignal(signal.SIGTERM)  # the command makes SIGTERM a KeyboardInterrupt
    try:
        res = CliRunner().invoke(app, ["matrix", "--methods", "wanda", "--models", str(tiny_llama_dir), "--tracks", "2",
                                       "--device", "cpu", "--runs-dir", str(tmp_path / "runs")])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().startswith("error:") and "the runner broke" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert [c["method"] for c in _summary(tmp_path / "runs")["cells"]] == ["wanda"]


def test_parallel_workers_get_the_users_visible_gpus(tmp_path, tiny_llama_dir, monkeypatch):
    """Worker i's jobs run on the i-th GPU the user made visible (CUDA_VISIBLE_DEVICES=2,3: GPUs 2
    and 3, not 0 and 1), wrapping when --jobs exceeds them; CPU jobs are pinned to none; a
    pinned --device cuda:N with parallel cells is a one-line error (each cell sees one GPU)."""
    from llmcbench.driver.errors import UserError
    from llmcbench.driver.matrix import _cell_runner

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    plan = _fake_matrix(tmp_path, tiny_llama_dir, jobs=3).cells[0].plan
    assert _cell_runner(plan, 1).cuda_visible is None  # a CPU job
    plan.device = "cuda"  # as planned on a GPU host
    assert [_cell_runner(plan, slot).cuda_visible for slot in range(3)] == ["2", "3", "2"]

    monkeypatch.setattr("llmcbench.driver.bench.resolve_device", lambda device: device)  # no GPU here
    spec = parse_spec({"methods": ["wanda"], "models": [str(tiny_llama_dir)], "tracks": "2", "device": "cuda:1", "jobs": 2})
    with pytest.raises(UserError, match=r"--device cuda:1 with 2 parallel cells.*use --device cuda"):
        plan_matrix(spec, tmp_path / "runs2")
    assert plan_matrix(parse_spec({**spec.model_dump(exclude_none=True), "jobs": 1}), tmp_path / "runs3").workers == 1


def test_a_preset_the_upstream_engine_cannot_run_is_an_unsupported_cell(tmp_path, tiny_llama_dir):
    """SmoothQuant's upstream code is W8A8 only: its track-2 W4A4 cell is marked unsupported at
    planning (it was planned, ran and failed in the job); the other cells plan as before."""
    spec = parse_spec({"methods": ["smoothquant", "wanda"], "presets": ["track2"], "models": [str(tiny_llama_dir)],
                       "tracks": "2", "engine": "upstream", "device": "cpu"})
    m = plan_matrix(spec, tmp_path / "runs")
    cells = {(c.method, c.preset): (c.status, c.error_type) for c in m.cells}
    assert cells[("smoothquant", "w4a4")] == ("unsupported", "unsupported")
    assert cells[("wanda", "unstructured-50")] == ("planned", None)
    assert "W8A8" in next(c.message for c in m.cells if c.method == "smoothquant")


def test_the_upstream_engine_runs_only_the_architectures_its_adapter_runs():
    """The registry's `methods` are the paper's Table 2 cells; the harness's upstream adapters
    run fewer (Wanda's main.py, SparseGPT's and GPTQ's llama.py are LLaMA scripts; no adapter has
    a ChatGLM branch). Those cells are unsupported up front, where they were planned, downloaded
    and failed in the job."""
    from llmcbench.driver.model_registry import lookup

    glm, opt, llama = lookup("chatglm2-6b"), lookup("opt-1.3b"), lookup("llama-2-7b")
    methods = ["wanda", "sparsegpt", "gptq", "awq", "smoothquant", "omniquant", "llm_pruner"]
    assert all(glm.supports(m, "upstream") for m in methods)
    assert [m for m in methods if opt.supports(m, "upstream") is None] == ["awq", "smoothquant", "omniquant"]
    assert all(llama.supports(m, "upstream") is None for m in methods)
    assert "runs llama models here, not opt" in opt.supports("wanda", "upstream")


def test_two_dense_runs_that_disagree_are_a_leaderboard_note(monkeypatch):
    """The leaderboard takes one dense baseline per (track, model, metric) from the matrix's
    cells (a track-2-only cell's dense evaluation measures the same ppl as the tracks 1/2/4
    one). Equal figures are one baseline and no note; a disagreement is said, with the value used."""
    import llmcbench.driver.matrix as matrix_mod
    from llmcbench.driver.matrix import Matrix, MatrixCell, leaderboard

    dense_ppl = {"wanda": 20.0, "gptq": 20.0, "awq": 21.5}

    def records(plan):
        rec = lambda method, value: MetricRecord(track=2, model="m", method=method, setting="s",  # noqa: E731
                                                 metric="wikitext2_ppl", value=value)
        return [rec("dense", dense_ppl[plan.method])], [rec(plan.method, 25.0)]

    monkeypatch.setattr(matrix_mod, "plan_eval_records", records)
    cells = [MatrixCell(method=m, preset="p", model="m", tracks=[2], status="done",
                         plan=SimpleNamespace(method=m, tracks=[2], runs={"compress": None}, model=SimpleNamespace(name="m")))
             for m in ("wanda", "gptq")]
    spec = SimpleNamespace()
    rows, notes, problem = leaderboard(Matrix(spec=spec, runs_dir=Path("."), cells=cells))
    assert problem is None and notes == [] and {r.method for r in rows} == {"wanda", "gptq"}
    cells.append(MatrixCell(method="awq", preset="p", model="m", tracks=[2], status="cached",
                            plan=SimpleNamespace(method="awq", tracks=[2], runs={"compress": None}, model=SimpleNamespace(name="m"))))
    rows, notes, problem = leaderboard(Matrix(spec=spec, runs_dir=Path("."), cells=cells))
    assert problem is None and len(notes) == 1
    assert "wikitext2_ppl" in notes[0] and "20 (used) vs 21.5 (awq p)" in notes[0]
    om = {r.method: r.value for r in rows}
    assert om["awq"] == pytest.approx(om["wanda"])  # scored against the first baseline, as the note says
