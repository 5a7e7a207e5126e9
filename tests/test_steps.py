"""`llmcbench compress` and `llmcbench eval` (SPEC.md section 8): a bench's steps one at a time,
through the real CLI, sharing bench's cache both ways."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

GB = 1e9


def _runs(store: Path) -> dict[str, tuple[dict, dict, Path]]:
    """run dir name (hash) -> (job.json, result.json, run dir) of every finished run."""
    out = {}
    for result in store.glob("*/*/result.json"):
        out[result.parent.name] = (json.loads((result.parent / "job.json").read_text()), json.loads(result.read_text()),
                                   result.parent)
    return out


def _job_lines(stdout: str) -> dict[str, tuple[str, str]]:
    """`<key>: cached|ran (<hash12>) <run dir>` lines -> key: (status, hash12)."""
    return {m[1]: (m[2], m[3]) for m in re.finditer(r"^([a-z0-9 _]+): (cached|ran) \(([0-9a-f]{12})\) \S+$", stdout, re.M)}


def _value(stdout: str, label: str) -> str:
    m = re.search(rf"│\s+\d*\s+│ {re.escape(label)}\s+│\s+(\S+) │", stdout)
    assert m, (label, stdout)
    return m[1]


def test_compress_then_eval_then_bench_share_one_cache(tiny_llama_dir, tmp_path, run_cli, one_line_error):
    model = str(tiny_llama_dir)
    store = tmp_path / "runs"

    def cli(*args):
        proc = run_cli(*args, "--model", model, "--runs-dir", "runs", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    # eval before compress: one line naming the command that makes the artifact; nothing written
    proc = run_cli("eval", "--method", "wanda", "--model", model, "--runs-dir", "runs", cwd=tmp_path)
    one_line_error(proc, "not compressed in runs yet", "llmcbench compress --method wanda --preset unstructured-50")
    assert not list(store.glob("*/*"))

    out = cli("compress", "--method", "wanda")
    jobs = _job_lines(out)
    assert list(jobs) == ["compress"] and jobs["compress"][0] == "ran", out
    runs = _runs(store)
    assert len(runs) == 1  # the compress job alone
    job, result, comp_dir = next(iter(runs.values()))
    assert job["kind"] == "compress" and comp_dir.name.startswith(jobs["compress"][1])
    assert (comp_dir / "model" / "compression.json").is_file()
    assert _value(out, "measured sparsity") == f"{result['metrics']['compression']['measured_sparsity']:.4f}"
    assert float(_value(out, "measured sparsity")) == 0.5
    assert _value(out, "compression step (s)") == f"{result['metrics']['track3']['compress_s']:.1f}"

    out = cli("eval", "--method", "wanda", "--tracks", "3,4")
    jobs = _job_lines(out)
    assert jobs["compress"] == ("cached", comp_dir.name[:12]) and jobs["compressed eval"][0] == "ran", out
    runs = _runs(store)
    comp_eval = next(r for h, r in runs.items() if h.startswith(jobs["compressed eval"][1]))
    t4 = comp_eval[1]["metrics"]["track4"]
    assert comp_eval[0]["model"]["identity"] == f"artifact:{comp_dir.name}"
    assert _value(out, "size on disk (GB)") == f"{t4['model_size_bytes'] / GB:.4f}"
    assert _value(out, "compression step (s)") == f"{result['metrics']['track3']['compress_s']:.1f}"  # track 3: read back

    # bench with the same options: both steps are cache hits, only the dense evaluation runs
    cli("bench", "--method", "wanda", "--tracks", "3,4")
    bench = json.loads((comp_dir / "bench.json").read_text())["jobs"]
    assert {k: j["cached"] for k, j in bench.items()} == {"compress": True, "dense eval": False, "compressed eval": True}
    assert bench["compressed eval"]["hash"] == comp_eval[2].name

    # the model alone: bench's dense evaluation, the same job
    out = cli("eval", "--tracks", "4")
    assert _job_lines(out) == {"eval": ("cached", bench["dense eval"]["hash"][:12])}, out
    dense_macs = _runs(store)[bench["dense eval"]["hash"]][1]["metrics"]["track4"]["macs"]["effective_macs"]

    # a compressed model dir evaluated alone runs as its compression.json declares, under its method's name
    proc = run_cli("eval", "--model", str(comp_dir / "model"), "--tracks", "4", "--runs-dir", "runs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "has a compression.json: evaluated as it declares (wanda unstructured-50)" in proc.stdout
    alone_hash = _job_lines(proc.stdout)["eval"][1]
    alone_job, alone_result, alone_dir = next(r for h, r in _runs(store).items() if h.startswith(alone_hash))
    assert (alone_job["method"], alone_job["preset"], alone_job["model"]["source"]) == ("wanda", "unstructured-50", "local")
    assert alone_dir.parent.name.startswith("wanda-unstructured-50-")
    alone_macs = alone_result["metrics"]["track4"]["macs"]["effective_macs"]
    assert alone_macs == t4["macs"]["effective_macs"] < dense_macs  # the declared sparsity counted, as in the bench

    # the reviewer bundle reproduces the eval-only run with its own `llmcbench eval` line, after the bench's
    proc = run_cli("bundle", "runs", "-o", "b.tar.gz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        script = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("reproduce.sh"))).read().decode()
    commands = [ln for ln in script.splitlines() if "llmcbench " in ln and not ln.startswith("#")]
    assert [c.split("llmcbench ")[1].split()[0] for c in commands] == ["bench", "eval", "report"], script
    assert f"--model runs/{comp_dir.parent.name}/{comp_dir.name}/model --tracks 4" in commands[1]
    proc = run_cli("verify", "b.tar.gz", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("ok:"), proc.stdout + proc.stderr


def test_steps_refuse_what_they_cannot_do(tiny_llama_dir, tmp_path, run_cli, one_line_error):
    model = str(tiny_llama_dir)
    cases = [
        (("eval", "--tracks", "3,4"), ("track 3 measures a compression step", "--method")),
        (("eval", "--preset", "w8a16"), ("name a compression: pass --method too",)),
        (("compress", "--method", "nosuch"), ("nosuch",)),
        (("eval", "--method", "gptq", "--preset", "2:4"), ("2:4",)),
        (("eval", "--tracks", "9"), ("unknown track 9",)),
    ]
    for args, needles in cases:
        proc = run_cli(*args, "--model", model, "--runs-dir", "runs", cwd=tmp_path)
        one_line_error(proc, *needles)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "compression.json").write_text('{"method": "wanda", "weight_bits": "sixteen"}')
    proc = run_cli("eval", "--model", str(broken), "--runs-dir", "runs", cwd=tmp_path)
    one_line_error(proc, "compression.json", "invalid Compression", "fix or remove it")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/*"))


def test_steps_on_the_embedded_model_are_the_bench_jobs(embedded_store, tmp_path, run_cli):
    """On the embedded SmolLM2 store that `make bench` made (Wanda, SparseGPT): compress and eval
    find exactly the bench's jobs, and eval prints the figures its result.json holds."""
    local, _, _ = embedded_store
    shutil.copytree(local, tmp_path / "runs", symlinks=True)
    runs = _runs(tmp_path / "runs")
    by_key = {}
    for h, (job, result, _) in runs.items():
        if job["kind"] == "compress":
            by_key[job["method"], "compress"] = (h, result)
        elif job["kind"] == "eval" and 1 in job["evaluation"]["tracks"]:
            source = "dense" if job["model"]["source"] != "artifact" else job["method"]
            by_key[source, "eval"] = (h, result)

    proc = run_cli("compress", "--method", "wanda", "--runs-dir", "runs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _job_lines(proc.stdout) == {"compress": ("cached", by_key["wanda", "compress"][0][:12])}

    proc = run_cli("eval", "--method", "sparsegpt", "--runs-dir", "runs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _job_lines(proc.stdout) == {"compress": ("cached", by_key["sparsegpt", "compress"][0][:12]),
                                       "compressed eval": ("cached", by_key["sparsegpt", "eval"][0][:12])}
    t1 = by_key["sparsegpt", "eval"][1]["metrics"]["track1"]
    assert _value(proc.stdout, "WikiText-2 ppl") == f"{t1['wikitext2']['ppl']:.2f}"
    assert _value(proc.stdout, "ARC-e") == f"{t1['tasks']['arc_e']['accuracy_pct']:.2f}"

    proc = run_cli("eval", "--runs-dir", "runs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _job_lines(proc.stdout) == {"eval": ("cached", by_key["dense", "eval"][0][:12])}
    dense_ppl = by_key["dense", "eval"][1]["metrics"]["track1"]["wikitext2"]["ppl"]
    assert _value(proc.stdout, "WikiText-2 ppl") == f"{dense_ppl:.2f}" != f"{t1['wikitext2']['ppl']:.2f}"
    assert len(_runs(tmp_path / "runs")) == len(runs)  # nothing new: every step was the bench's own job


def test_make_targets_run_the_steps_with_the_bench_variables(tiny_llama_dir, tmp_path):
    """`make compress` and `make eval` take bench's variables (README): the same jobs, one cache."""
    import os
    import subprocess
    import sys

    project = Path(__file__).resolve().parents[1]
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "llmcbench").is_file():
        pytest.skip(f"no llmcbench console script beside {sys.executable} (the project is not pip-installed here)")
    stamp = tmp_path / "installed"
    stamp.touch()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"}
    common = [f"BIN={bin_dir}", f"STAMP={stamp}", f"MODEL={tiny_llama_dir}", f"RUNS={tmp_path / 'runs'}", "DEVICE=cpu"]

    def make(*args):
        proc = subprocess.run(["make", "-s", "-C", str(project), *args, *common], capture_output=True, text=True, env=env,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return _job_lines(proc.stdout)

    assert make("compress", "METHOD=wanda", "PRESET=2:4")["compress"][0] == "ran"
    jobs = make("eval", "METHOD=wanda", "PRESET=2:4", "TRACKS=3,4")
    assert jobs["compress"][0] == "cached" and jobs["compressed eval"][0] == "ran", jobs
    assert list(make("eval", "METHOD=", "TRACKS=4")) == ["eval"]
    from llmcbench.driver.store import cell_name

    cells = sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))
    name = Path(tiny_llama_dir).name.lower()
    assert cells == [cell_name("dense", None, name), cell_name("wanda", "2:4", name)], cells


DRIFT_TOML = """name = "drift"
kind = "pruning"
title = "test method whose weights depend on the environment, as a recompute on another machine's threads does"
paper_preset = "a"

[upstream]
repo = "https://example.invalid/none"
commit = "0000000000000000000000000000000000000000"

[calibration]
nsamples = 2
seqlen = 16

[engines.reference]
module = "reference"

[presets.a]
"""

DRIFT_ENGINE = '''import os

import torch

from llmcbench.driver.contract import Compression


def compress(model, calibration_ids, params, device):
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1 + float(os.environ.get("DRIFT_BY", "0")))
    return Compression(method="drift", sparsity_pattern="none", notes=["test method: one weight scaled by DRIFT_BY"])
'''


def test_an_evaluation_of_a_recomputed_artifact_is_not_a_cache_hit(tiny_llama_dir, tmp_path, run_cli):
    """The compressed evaluation's hash is planned before its compress job runs, so it names the
    compress job, not its weights. `compress --force` may recompute them differently (another
    thread count, another GPU): the evaluation of the old weights is then stale, not a cache hit,
    and the store report does not show it beside the new artifact's track 3."""
    from llmcbench.driver.contract import Result, artifact_digest, read_record

    method = tmp_path / "extra" / "drift"
    method.mkdir(parents=True)
    (method / "method.toml").write_text(DRIFT_TOML)
    (method / "reference.py").write_text(DRIFT_ENGINE)

    def cli(*args, drift="0"):
        proc = run_cli(*args, "--model", str(tiny_llama_dir), "--runs-dir", "runs", "--device", "cpu", cwd=tmp_path,
                       env={"LLMCBENCH_METHODS_PATH": str(tmp_path / "extra"), "DRIFT_BY": drift})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return _job_lines(proc.stdout)

    def evaluated(eval_hash12):
        job, _, run_dir = next(r for h, r in _runs(tmp_path / "runs").items() if h.startswith(eval_hash12))
        return job["model"]["artifact_sha256"], run_dir

    comp = cli("compress", "--method", "drift")["compress"]
    first = cli("eval", "--method", "drift", "--tracks", "4")["compressed eval"]
    assert first[0] == "ran"
    comp_dir = next((tmp_path / "runs").glob(f"drift-*/{comp[1]}*"))
    digest, eval_dir = evaluated(first[1])
    assert digest == artifact_digest(read_record(comp_dir / "result.json", Result))
    assert cli("eval", "--method", "drift", "--tracks", "4")["compressed eval"] == ("cached", first[1])

    assert cli("compress", "--method", "drift", "--force", drift="0.5")["compress"] == ("ran", comp[1])  # same job
    new_digest = artifact_digest(read_record(comp_dir / "result.json", Result))
    assert new_digest != digest
    proc = run_cli("report", "runs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "runs" / "report" / "report.md").read_text()
    assert "scored this cell's artifact before it was recomputed with other weights" in report, report
    assert f"({eval_dir.parent.name}/{eval_dir.name})" in report  # the stale run, named in the store

    again = cli("eval", "--method", "drift", "--tracks", "4")["compressed eval"]
    assert again == ("ran", first[1])  # the same job, run again on the new weights
    assert evaluated(first[1]) == (new_digest, eval_dir)
    # the same weights once more (same DRIFT_BY): the evaluation stays a cache hit
    assert cli("compress", "--method", "drift", "--force", drift="0.5")["compress"] == ("ran", comp[1])
    assert artifact_digest(read_record(comp_dir / "result.json", Result)) == new_digest
    assert cli("eval", "--method", "drift", "--tracks", "4")["compressed eval"] == ("cached", first[1])
    proc = run_cli("report", "runs", cwd=tmp_path)
    assert "recomputed with other weights" not in (tmp_path / "runs" / "report" / "report.md").read_text()
