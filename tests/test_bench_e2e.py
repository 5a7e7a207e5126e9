"""The spine end to end: `llmcbench bench --method wanda` on the embedded model, offline, CPU,
quick profile — then the same command again, which must be a cache hit — and SparseGPT into
the same store, which reuses the dense evaluation (the `embedded_store` fixture, conftest.py)."""

from __future__ import annotations

import json

import pytest

from llmcbench.driver.contract import Compression, Job, Result, read_record
from llmcbench.driver.fsio import sha256_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_run(embedded_store):
    """(runs, first stdout, second stdout, cold seconds, warm seconds) of the Wanda benches."""
    runs, stdout, seconds = embedded_store
    return runs, stdout["wanda"], stdout["wanda-again"], seconds["wanda"], seconds["wanda-again"]


def _runs(runs, cell_prefix):
    out = {}
    for job_path in runs.glob(f"{cell_prefix}*/*/job.json"):
        job = read_record(job_path, Job)
        out[job.kind] = (job, read_record(job_path.parent / "result.json", Result), job_path.parent)
    return out


def test_table_and_oms_printed(bench_run):
    _, stdout, _, _, _ = bench_run
    for needle in ("MMLU", "ARC-c", "WikiText-2 ppl", "om_ka", "om_ia", "om_perf", "om_inf", "om_train", "profile quick"):
        assert needle in stdout, needle


def test_run_dirs_hold_the_contract_files(bench_run):
    runs, *_ = bench_run
    wanda = _runs(runs, "wanda-unstructured-50-smollm2")
    job, result, run_dir = wanda["compress"]
    assert {"job.json", "result.json", "log.txt", "report.md", "bench.json", "model"} <= {p.name for p in run_dir.iterdir()}
    assert result.status == "ok" and result.job_hash == run_dir.name
    assert result.environment.torch and result.environment.transformers and result.environment.python
    assert result.provenance.upstream_commit == "8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6"
    assert result.compress_s > 0 and result.load_s > 0 and result.save_s > 0 and result.peak_rss_bytes > 0
    # track 3's host memory is the compression step's (the peak reset after loading), below the job's lifetime peak
    t3 = result.metrics["track3"]
    assert t3["compress_peak_rss_scope"] == "compress_step" and 0 < t3["compress_peak_rss_bytes"] <= result.peak_rss_bytes
    assert t3["compress_peak_gpu_bytes"] is None and t3["compress_gpu_used_nvml_bytes"] is None  # a CPU job: no GPU figures
    assert result.input_sha256["job.json"] == sha256_file(run_dir / "job.json")
    assert result.input_sha256["calibration"] == sha256_file(
        __import__("llmcbench.driver.data", fromlist=["x"]).SHIPPED_DATA / "hf/allenai__c4/en/train.jsonl")
    for rel, digest in result.output_sha256.items():
        assert sha256_file(run_dir / rel) == digest
    decl = read_record(run_dir / "model" / "compression.json", Compression)
    assert decl.method == "wanda" and decl.preset == "unstructured-50" and decl.sparsity_pattern == "unstructured"
    assert len(decl.layers) == 30 * 7
    assert all(abs(layer.sparsity - 0.5) < 0.01 for layer in decl.layers.values())
    assert job.calibration.nsamples == 16 and job.calibration.seqlen == 128
    report = (run_dir / "report.md").read_text()
    assert "profile: **quick**" in report and "om_perf" in report
    # MKL VML's kernels are resolved before the model's first multi-threaded op (driver/numerics.py)
    for kind, first_work in (("compress", "] loaded "), ("eval", "] track ")):
        log = (wanda[kind][2] / "log.txt").read_text()
        assert log.index("MKL VML kernels resolved on one thread") < log.index(first_work), kind


def test_compressed_vs_dense_figures(bench_run):
    runs, *_ = bench_run
    dense = _runs(runs, "dense-smollm2")["eval"][1].metrics
    comp_job, comp_result, _ = _runs(runs, "wanda-unstructured-50-smollm2")["eval"]
    comp = comp_result.metrics
    assert comp_job.model.source == "artifact"
    # pruning half the weights of a 135M model must cost perplexity, but not destroy it
    assert dense["track1"]["wikitext2"]["ppl"] < comp["track1"]["wikitext2"]["ppl"] < 20 * dense["track1"]["wikitext2"]["ppl"]
    # effective MACs: the pruned block linears count half, the lm_head (not pruned, as upstream) in full
    # (the dense GGUF-derived weights hold a few exact zeros, hence approx)
    d, c = dense["track4"]["macs"], comp["track4"]["macs"]
    assert d["raw_macs"] == c["raw_macs"]
    block = {n: v for n, v in c["linears"].items() if ".layers." in f".{n}"}
    assert len(block) == 30 * 7
    block_raw = sum(v["raw_macs"] for v in block.values())
    assert sum(v["effective_macs"] for v in block.values()) == pytest.approx(0.5 * block_raw, rel=0.01)
    rest_raw = c["linear_raw_macs"] - block_raw
    assert rest_raw > 0  # the lm_head
    assert c["linear_effective_macs"] == pytest.approx(0.5 * block_raw + rest_raw, rel=0.01)
    assert c["effective_macs"] < d["effective_macs"]
    assert dense["track4"]["model_size_bytes"] == comp["track4"]["model_size_bytes"]  # dense layout with zeros
    assert set(dense["track1"]["tasks"]) == {"mmlu", "arc_c", "arc_e", "hellaswag", "piqa", "winogrande", "qnli", "mnli"}


def test_rerun_is_a_cache_hit(bench_run):
    runs, _, stdout2, cold_s, warm_s = bench_run
    assert stdout2.count("cached") == 3
    assert warm_s < 0.2 * cold_s, (warm_s, cold_s)
    bench = json.loads(next(runs.glob("wanda-*/*/bench.json")).read_text())
    assert all(j["cached"] for j in bench["jobs"].values())


def test_second_method_reuses_the_dense_evaluation(embedded_store):
    runs, stdout, _ = embedded_store
    assert stdout["sparsegpt"].count("cached") == 1  # the dense eval; compress and compressed eval ran
    dense = _runs(runs, "dense-smollm2")
    assert len(dense) == 1 and len(list(runs.glob("dense-smollm2*/*/result.json"))) == 1
    job, result, run_dir = _runs(runs, "sparsegpt-unstructured-50-smollm2")["compress"]
    assert result.status == "ok" and job.method == "sparsegpt"
    decl = read_record(run_dir / "model" / "compression.json", Compression)
    assert decl.method == "sparsegpt" and len(decl.layers) == 30 * 7
    assert all(abs(layer.sparsity - 0.5) < 0.01 for layer in decl.layers.values())
    d_ppl = dense["eval"][1].metrics["track1"]["wikitext2"]["ppl"]
    s_ppl = _runs(runs, "sparsegpt-unstructured-50-smollm2")["eval"][1].metrics["track1"]["wikitext2"]["ppl"]
    assert d_ppl < s_ppl < 20 * d_ppl
