"""The store report, compare-with-paper, the fairness check, and bundle/verify, on synthetic
stores written through the contract types (Job, Result, Compression) with known values."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from llmcbench.driver.bench import JobRun
from llmcbench.driver.contract import Calibration, Compression, EvalSettings, Job, ModelRef, Provenance, Result, Environment
from llmcbench.driver.fsio import sha256_file, sha256_tree, write_atomic, write_record
from llmcbench.driver.reporting.build import build_store_report
from llmcbench.driver.reporting.bundle import MANIFEST, TOP, _targz, make_bundle, verify_bundle
from llmcbench.driver.reporting.write import write_store_report
from llmcbench.driver.store import cell_name

ENV = "test-environment"
LLAMA2 = ModelRef(name="llama-2-7b-hf", source="hub", identity="hub:meta-llama/Llama-2-7b-hf@01c7f73d771dfac7d292323805ebc428287df4f9",
                  revision="01c7f73d771dfac7d292323805ebc428287df4f9", path="/hf/llama-2-7b")
EMBEDDED = ModelRef(name="smollm2-135m-instruct", source="embedded", identity="sha256:" + "e" * 64, path="/cache/smollm2")
CALIB_SHA = "c" * 64

# The paper's Table 1 / Table 3 rows for LLaMA-2-7B (tracks/paper/*.csv).
PAPER_DENSE = {"mmlu": 40.52, "arc_c": 46.33, "arc_e": 74.58, "hellaswag": 75.98, "piqa": 79.11, "winogrande": 69.06,
               "qnli": 50.53, "mnli": 44.31, "wikitext2_ppl": 5.12, "gpu_memory_gb": 22.96, "model_size_gb": 12.55, "tmacs": 0.85}
PAPER_WANDA = {"mmlu": 29.67, "arc_c": 42.75, "arc_e": 69.07, "hellaswag": 70.78, "piqa": 76.66, "winogrande": 68.90,
               "qnli": 50.67, "mnli": 35.28, "wikitext2_ppl": 6.46, "gpu_memory_gb": 22.96, "model_size_gb": 12.55, "tmacs": 0.43}
PAPER_WANDA_24 = {"mmlu": 23.63, "arc_c": 32.25, "arc_e": 58.46, "hellaswag": 55.11, "piqa": 71.71, "winogrande": 62.43,
                  "qnli": 50.64, "mnli": 35.12, "wikitext2_ppl": 6.51}
# Our synthetic measurement of Wanda 50%: the paper's figures plus these offsets.
WANDA_OFFSET = {"mmlu": +0.5, "arc_c": -3.0, "wikitext2_ppl": +0.05, "tmacs": +0.05}


def eval_metrics(values: dict[str, float], tracks: tuple = (1, 4)) -> dict:
    """What an evaluation of `tracks` (of 1, 2, 4) records."""
    out = {}
    if 1 in tracks:
        tasks = {k: {"accuracy_pct": v} for k, v in values.items()
                 if k not in ("wikitext2_ppl", "gpu_memory_gb", "model_size_gb", "tmacs", "checkpoint_memory_gb")}
        out["track1"] = {"tasks": tasks, "wikitext2": {"ppl": values["wikitext2_ppl"]}, "eval_s": 1.0}
    if 2 in tracks:
        out["track2"] = {"wikitext2": {"ppl": values["wikitext2_ppl"]}}
    if 4 in tracks:
        out["track4"] = {"inference_memory_bytes": int(round(values["gpu_memory_gb"] * 1e9)),
                         "model_size_bytes": int(round(values["model_size_gb"] * 1e9)),
                         "macs": {"effective_macs": values["tmacs"] * 1e12, "raw_macs": 0.85e12}, "macs_seqlen": 128,
                         "inference_memory_form": "checkpoint"}
        if "checkpoint_memory_gb" in values:  # a packed export, measured on an integer kernel (eval_inference_memory)
            out["track4"].update(inference_memory_form="packed export on aten._weight_int8pack_mm",
                                 inference_memory_checkpoint_bytes=int(round(values["checkpoint_memory_gb"] * 1e9)))
    return out


class SyntheticStore:
    """Writes run dirs exactly as the job process does: job.json, log.txt, model/, sealed result.json."""

    def __init__(self, root: Path):
        self.root = root
        self.clock = 0

    def _time(self) -> str:
        self.clock += 1
        return f"2025-01-01T00:{self.clock // 60:02d}:{self.clock % 60:02d}+00:00"

    def _write(self, cell: str, job: Job, metrics: dict, inputs: dict | None = None, model_files: dict | None = None,
               provenance: Provenance | None = None) -> Path:
        h = job.job_hash(ENV)
        d = self.root / cell / h
        write_record(d / "job.json", job)
        write_atomic(d / "log.txt", f"log of {job.kind} {job.method}\n")
        outputs = {}
        if model_files is not None:
            for name, data in model_files.items():
                write_atomic(d / "model" / name, data)
            outputs = {f"model/{k}": v for k, v in sha256_tree(d / "model").items()}
        started = self._time()
        result = Result(job_hash=h, status="ok", started_at=started, finished_at=self._time(), wall_s=10.0,
                        compress_s=metrics.get("track3", {}).get("compress_s"), environment=Environment(python="3.11", torch="2.4", transformers="4.56", lm_eval="0.4.13"),
                        provenance=provenance or Provenance(runner="local"),
                        input_sha256={"job.json": sha256_file(d / "job.json"), **(inputs or {})}, output_sha256=outputs,
                        metrics=metrics).sealed()
        write_record(d / "result.json", result)
        return d

    def dense(self, model: ModelRef, values: dict, profile: str = "paper", tracks: tuple = (1, 4)) -> Path:
        job = Job(kind="eval", method="dense", model=model, evaluation=EvalSettings(tracks=list(tracks)), profile=profile, device="cuda")
        return self._write(cell_name("dense", None, model.name), job, eval_metrics(values, tracks))

    def method(self, model: ModelRef, method: str, preset: str, params: dict, values: dict, compress_s: float,
               memory_gb: float, profile: str = "paper", calib_sha: str = CALIB_SHA, nsamples: int = 128,
               image_digest: str | None = None, tracks: tuple = (1, 4), overrides: dict | None = None) -> tuple[Path, Path]:
        cell = cell_name(method, preset, model.name)
        comp_job = Job(kind="compress", method=method, preset=preset, params=params, overrides=overrides, model=model,
                       profile=profile, device="cuda", calibration=Calibration(nsamples=nsamples, seqlen=2048, seed=0))
        declaration = Compression(method=method, preset=preset, sparsity_pattern="unstructured", measured_sparsity=0.5)
        comp = self._write(cell, comp_job, {"track3": {"compress_s": compress_s, "compress_peak_rss_bytes": int(3e9),
                                                       "compress_peak_gpu_bytes": int(memory_gb * 1e9), "device": "cuda"}},
                           inputs={"calibration": calib_sha},
                           model_files={"compression.json": declaration.model_dump_json(indent=2),
                                        "model.safetensors": f"weights of {method} {preset}".encode()},
                           provenance=Provenance(runner="docker" if image_digest else "local",
                                                 image=f"llmcbench/{method}" if image_digest else None, image_digest=image_digest))
        return comp, self.evaluate(model, comp, values, profile, tracks)

    def evaluate(self, model: ModelRef, comp: Path, values: dict, profile: str = "paper", tracks: tuple = (1, 4)) -> Path:
        """An evaluation of the artifact of the compress run in `comp` (bench runs one per track group)."""
        comp_job = Job.model_validate_json((comp / "job.json").read_text())
        artifact = ModelRef(name="model", source="artifact", identity=f"artifact:{comp.name}", path=str(comp / "model"))
        ev_job = Job(kind="eval", method=comp_job.method, preset=comp_job.preset, model=artifact,
                     evaluation=EvalSettings(tracks=list(tracks)), profile=profile, device="cuda")
        return self._write(cell_name(comp_job.method, comp_job.preset, model.name), ev_job, eval_metrics(values, tracks))


def wanda_values() -> dict:
    return {k: v + WANDA_OFFSET.get(k, 0.0) for k, v in PAPER_WANDA.items()}


def write_llama_store(root: Path) -> Path:
    """LLaMA-2-7B (paper profile): dense, Wanda 50% (paper figures + known offsets), Wanda 2:4."""
    s = SyntheticStore(root)
    s.dense(LLAMA2, PAPER_DENSE)
    s.method(LLAMA2, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.5}, wanda_values(), 60.0, 14.0)
    two_four = {**PAPER_WANDA, **PAPER_WANDA_24}
    s.method(LLAMA2, "wanda", "2:4", {"pattern": "n:m", "n": 2, "m": 4, "sparsity": 0.5}, two_four, 30.0, 20.0)
    return root


@pytest.fixture
def llama_store(tmp_path) -> Path:
    return write_llama_store(tmp_path / "runs")


# ---------------------------------------------------------------- compare with paper


def _row(report, method: str, setting: str, quantity: str):
    rows = [r for r in report.paper if r.method == method and r.setting == setting and r.quantity == quantity]
    assert len(rows) == 1, (method, setting, quantity, rows)
    return rows[0]


def test_compare_with_paper_known_deltas(llama_store):
    report = build_store_report(llama_store)
    (group,) = report.groups
    assert group.paper_model == "LLaMA-2-7B" and group.profile == "paper"
    for metric, paper in PAPER_WANDA.items():
        row = _row(report, "wanda", "unstructured-50", metric)
        assert (row.paper_model, row.paper_method, row.paper_setting) == ("LLaMA-2-7B", "Wanda", "50%")
        in_gb = paper * GIB_IN_GB if metric in ("gpu_memory_gb", "model_size_gb") else paper  # the paper's GiB
        assert row.paper == pytest.approx(in_gb)
        assert row.measured == pytest.approx(paper + WANDA_OFFSET.get(metric, 0.0))  # recorded in GB
        assert row.delta == pytest.approx(paper + WANDA_OFFSET.get(metric, 0.0) - in_gb, abs=1e-6)
        assert row.source.startswith("wanda-unstructured-50-llama-2-7b-hf/") and row.source.endswith("/result.json")
    verdicts = {m: _row(report, "wanda", "unstructured-50", m).verdict for m in PAPER_WANDA}
    assert verdicts["mmlu"] == "ok"            # +0.5 pt, tolerance ±1 pt
    assert verdicts["arc_c"] == "outside"      # -3 pt
    assert verdicts["wikitext2_ppl"] == "ok"   # +0.05 on 6.46 = 0.8%, tolerance ±2%
    assert verdicts["tmacs"] == "outside"      # +0.05 on 0.43 = 11.6%, tolerance ±5%
    assert [m for m, v in verdicts.items() if v == "outside"] == ["arc_c", "tmacs"]
    # Wanda 2:4 is the paper's 2:4 row; the dense baseline its dense row: deltas 0
    for metric, paper in PAPER_WANDA_24.items():
        row = _row(report, "wanda", "2:4", metric)
        assert row.paper_setting == "2:4" and row.delta == pytest.approx(0, abs=1e-9) and row.verdict == "ok"
    for metric in PAPER_DENSE:
        if metric not in ("gpu_memory_gb", "model_size_gb"):
            assert _row(report, "dense", "-", metric).delta == pytest.approx(0, abs=1e-9)


GIB_IN_GB = 2**30 / 1e9


def test_the_papers_sizes_are_gib_and_are_compared_in_gb():
    """Table 3 prints GiB under "GB": LLaMA-2-7B's 6,738,415,616 fp16 weights are 12.55 GiB, its
    printed size, and LLaMA-3-8B's 8,030,261,248 are 14.96. The store measures GB (10^9 bytes):
    the paper's figure is converted before the comparison, else an exact fp16 checkpoint read
    +7.4% against it."""
    from llmcbench.driver.reporting.paper import _paper_value

    for model, params in (("LLaMA-2-7B", 6_738_415_616), ("LLaMA-3-8B", 8_030_261_248)):
        size = _paper_value(4, model, "dense", "FP16", "model_size_gb")
        assert size == pytest.approx(params * 2 / 1e9, rel=1e-3), (model, size)
    assert _paper_value(4, "LLaMA-2-7B", "dense", "FP16", "tmacs") == pytest.approx(0.85)  # not a size: as printed


def test_a_packed_exports_memory_is_compared_with_table_3_and_its_checkpoint_named(tmp_path):
    """GPTQ INT8 measured on its packed export (Table 3: 15.16 against dense 22.96) is the figure
    compared with the paper and scored; the cell says how it was measured and what its
    dequantized checkpoint takes."""
    s = SyntheticStore(tmp_path / "runs")
    s.dense(LLAMA2, PAPER_DENSE)
    gptq = {**PAPER_WANDA, "gpu_memory_gb": 15.16, "model_size_gb": 6.67, "tmacs": 0.23, "checkpoint_memory_gb": 24.0}
    s.method(LLAMA2, "gptq", "w8a16", {"bits": 8}, gptq, 60.0, 14.0)
    report = build_store_report(tmp_path / "runs")
    cell = next(c for c in report.groups[0].cells if c.method == "gptq")
    assert cell.notes == ["track 4: the inference memory is the packed export's, held as integer codes on torch's kernels "
                          "(aten._weight_int8pack_mm); the dequantized checkpoint, which the accuracy tracks run, takes 24.0000 GB"]
    row = _row(report, "gptq", "w8a16", "gpu_memory_gb")
    assert (row.paper_method, row.paper_setting, row.measured) == ("GPTQ", "INT8", pytest.approx(15.16))
    om_inf = next(o for o in cell.oms if o.om == "om_inf")
    assert om_inf.value == pytest.approx(100 * math.sqrt(((22.96 / 15.16) ** 2 + (12.55 / 6.67) ** 2 + (0.85 / 0.23) ** 2) / 3), rel=1e-3)


def test_a_delta_just_past_the_tolerance_never_reads_as_on_it(tmp_path):
    """+1.004 pt against a ±1 pt tolerance rounds to "+1.00" at the usual two decimals, next to
    "outside"; +0.1291 on 6.46 ppl (tolerance 2% = 0.1292) rounds to "+0.13", past it, next to
    "ok". The table shows one more digit each time, and the usual digits where they agree."""
    from llmcbench.driver.reporting.tables import paper_table

    s = SyntheticStore(tmp_path / "runs")
    s.dense(LLAMA2, PAPER_DENSE)
    offsets = {"mmlu": +1.004, "arc_c": -0.9996, "arc_e": -1.2, "wikitext2_ppl": +0.1291}
    s.method(LLAMA2, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.5},
             {k: v + offsets.get(k, 0.0) for k, v in PAPER_WANDA.items()}, 60.0, 14.0)
    report = build_store_report(tmp_path / "runs")
    table = paper_table(report)
    shown = {(row[2].text, row[5].text): (row[8].text, row[10].text) for row in table.rows}
    assert shown["wanda unstructured-50", "MMLU"] == ("+1.004", "outside")
    assert shown["wanda unstructured-50", "ARC-c"] == ("-1.00", "ok")        # rounds onto the bound: still within
    assert shown["wanda unstructured-50", "ARC-e"] == ("-1.20", "outside")   # the usual digits agree
    ppl = next(v for (m, label), v in shown.items() if m == "wanda unstructured-50" and "WikiText" in label)
    assert ppl == ("+0.129", "ok")


def test_compare_with_paper_oms_are_rescored_per_model(llama_store):
    report = build_store_report(llama_store)
    knowledge = ("mmlu", "arc_c", "arc_e")
    paper_ka = 100 * math.sqrt(sum((PAPER_WANDA[m] / PAPER_DENSE[m]) ** 2 for m in knowledge) / 3)
    ours_ka = 100 * math.sqrt(sum((wanda_values()[m] / PAPER_DENSE[m]) ** 2 for m in knowledge) / 3)
    row = _row(report, "wanda", "unstructured-50", "om_ka")
    assert row.paper == pytest.approx(paper_ka) and row.measured == pytest.approx(ours_ka)
    assert row.delta == pytest.approx(ours_ka - paper_ka)
    assert row.paper != pytest.approx(83.25, abs=0.01)  # the printed OM averages LLaMA-2-7B and LLaMA-3-8B
    assert _row(report, "wanda", "2:4", "om_perf").delta == pytest.approx(0, abs=1e-9)
    assert {r.quantity for r in report.paper if r.method == "wanda" and r.quantity.startswith("om_")} == {"om_ka", "om_ia", "om_perf", "om_inf"}


def test_compare_with_paper_matches_nothing_it_should_not(tmp_path):
    s = SyntheticStore(tmp_path / "runs")
    s.dense(EMBEDDED, PAPER_DENSE, profile="quick")
    s.method(EMBEDDED, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.5}, PAPER_WANDA, 5, 1, profile="quick")
    s.dense(LLAMA2, PAPER_DENSE, profile="quick")  # the paper's model, but a quick run: shown, never judged
    s.method(LLAMA2, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.5}, PAPER_WANDA, 5, 1, profile="quick")
    s.method(LLAMA2, "wanda", "4:8", {"pattern": "n:m", "n": 4, "m": 8, "sparsity": 0.5}, PAPER_WANDA, 5, 1)  # not a paper row
    report = build_store_report(tmp_path / "runs")
    assert not [r for r in report.paper if r.model == EMBEDDED.name]
    assert any("smollm2-135m-instruct (profile quick) matches no model of the paper" in n for n in report.paper_notes)
    quick = [r for r in report.paper if r.profile == "quick"]
    assert quick and all(r.verdict == "n/a" and "not comparable" in r.tolerance for r in quick)
    assert not [r for r in report.paper if r.setting == "4:8"]
    assert any("llama-2-7b-hf (profile paper) is the paper's LLaMA-2-7B, but none" in n for n in report.paper_notes)


def test_a_param_set_over_the_preset_is_named_and_never_compared_with_the_paper(tmp_path):
    """`--sparsity 0.6` on Wanda's unstructured-50, alone in the store: its label says so, and
    the paper's 50% row is not its reference (the run beside it at the preset's own 50% is)."""
    s = SyntheticStore(tmp_path / "runs")
    s.dense(LLAMA2, PAPER_DENSE)
    s.method(LLAMA2, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.6}, wanda_values(), 60.0, 14.0,
             overrides={"sparsity": 0.6})
    s.method(LLAMA2, "wanda", "2:4", {"pattern": "n:m", "n": 2, "m": 4, "sparsity": 0.5}, PAPER_WANDA, 30.0, 20.0)
    report = build_store_report(tmp_path / "runs")
    (group,) = report.groups
    assert sorted(c.setting for c in group.cells) == ["2:4", "unstructured-50 (sparsity=0.6)"]
    assert {r.setting for r in report.paper if r.method == "wanda"} == {"2:4"}
    # the same run at the preset's own sparsity, beside it: only that one meets the paper's row
    s.method(LLAMA2, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.5}, wanda_values(), 60.0, 14.0)
    report = build_store_report(tmp_path / "runs")
    assert sorted(c.setting for c in report.groups[0].cells) == ["2:4", "unstructured-50", "unstructured-50 (sparsity=0.6)"]
    assert {r.setting for r in report.paper if r.method == "wanda"} == {"2:4", "unstructured-50"}
    assert _row(report, "wanda", "unstructured-50", "mmlu").delta == pytest.approx(WANDA_OFFSET["mmlu"])


def test_runs_of_a_store_that_recorded_no_overrides_are_told_apart_by_their_params(tmp_path):
    s = SyntheticStore(tmp_path / "runs")
    s.dense(LLAMA2, PAPER_DENSE)
    for sparsity in (0.5, 0.6):
        s.method(LLAMA2, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": sparsity}, wanda_values(), 60.0, 14.0)
    report = build_store_report(tmp_path / "runs")
    assert sorted(c.setting for c in report.groups[0].cells) == ["unstructured-50 (sparsity=0.5)", "unstructured-50 (sparsity=0.6)"]
    assert not report.paper or {r.method for r in report.paper} == {"dense"}


def test_bench_with_sparsity_set_records_and_shows_it(tmp_path, tiny_llama_dir, run_cli):
    """The real command: `--sparsity 60%` prunes 60%, the job records it as set over the preset,
    the table names it; `--sparsity 50%` is the preset itself (the same job, a cache hit)."""
    runs = tmp_path / "runs"
    common = ["bench", "-m", "wanda", "--model", str(tiny_llama_dir), "--tracks", "3", "--device", "cpu", "--runs-dir", str(runs)]
    first = run_cli(*common)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "wanda unstructured-50 on" in first.stdout and "sparsity=" not in first.stdout
    proc = run_cli(*common, "--sparsity", "60%")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wanda unstructured-50 (sparsity=0.6) on" in proc.stdout
    jobs = {json.dumps(j.overrides): j for j in (Job.model_validate_json(p.read_text()) for p in runs.glob("wanda-*/*/job.json"))}
    assert set(jobs) == {"null", '{"sparsity": 0.6}'} and jobs['{"sparsity": 0.6}'].params["sparsity"] == 0.6
    (model_dir,) = [p.parent.parent for p in runs.glob("wanda-*/*/model/compression.json")
                    if Job.model_validate_json((p.parent.parent / "job.json").read_text()).overrides]
    declared = Compression.model_validate_json((model_dir / "model" / "compression.json").read_text())
    assert declared.measured_sparsity == pytest.approx(0.6, abs=0.01)
    (group,) = build_store_report(runs).groups
    assert sorted(c.setting for c in group.cells) == ["unstructured-50", "unstructured-50 (sparsity=0.6)"]
    again = run_cli(*common, "--sparsity", "50%")
    assert again.returncode == 0 and "sparsity=" not in again.stdout and "cached" in again.stdout
    assert len(list(runs.glob("wanda-*/*/job.json"))) == 2


# ---------------------------------------------------------------- scores and fairness


def test_cells_are_scored_against_their_dense_baseline(llama_store):
    (group,) = build_store_report(llama_store).groups
    cells = {c.setting: c for c in group.cells}
    assert set(cells) == {"unstructured-50", "2:4"}
    oms = {k: {o.om: o.value for o in c.oms} for k, c in cells.items()}
    # track 3: T_max = 60 s, M_max = 20 GB among the compared methods (SPEC 5), not x100
    assert oms["unstructured-50"]["om_train"] == pytest.approx(math.sqrt((1 + (20 / 14) ** 2) / 2))
    assert oms["2:4"]["om_train"] == pytest.approx(math.sqrt(((60 / 30) ** 2 + 1) / 2))
    inference = ("hellaswag", "piqa", "winogrande", "qnli", "mnli")
    ia = [(PAPER_WANDA_24[m] / PAPER_DENSE[m]) ** 2 for m in inference] + [(5.12 / 6.51) ** 2]
    assert oms["2:4"]["om_ia"] == pytest.approx(100 * math.sqrt(sum(ia) / len(ia)))
    mmlu = next(m for m in cells["2:4"].metrics if m.metric == "mmlu")
    assert (mmlu.dense, mmlu.compressed) == (pytest.approx(40.52), pytest.approx(23.63))
    assert mmlu.dense_source.startswith("dense-llama-2-7b-hf/") and mmlu.compressed_source.startswith("wanda-2-4-llama-2-7b-hf/")
    assert group.fairness_flags == []


def test_overlapping_evaluations_of_an_artifact_give_each_track_one_source(tmp_path):
    """The default bench (tracks 1,3,4) evaluates tracks 1,4; a later `TRACKS=all` bench the
    same artifact on 1,2,4, where inference memory reads a little different. Each track is
    scored from the latest evaluation that covers it, with that one's dense twin: the cell
    keeps all its OMs, and each OM links to the evaluation it came from."""
    s = SyntheticStore(tmp_path / "runs")
    s.dense(LLAMA2, PAPER_DENSE, tracks=(1, 4))
    comp, old = s.method(LLAMA2, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.5}, wanda_values(),
                         60.0, 14.0, tracks=(1, 4))
    dense = s.dense(LLAMA2, dict(PAPER_DENSE, gpu_memory_gb=22.97), tracks=(1, 2, 4))
    new = s.evaluate(LLAMA2, comp, dict(wanda_values(), gpu_memory_gb=22.95), tracks=(1, 2, 4))
    source = {d: f"{d.relative_to(tmp_path / 'runs').as_posix()}/result.json" for d in (old, dense, new)}
    (cell,) = build_store_report(tmp_path / "runs").groups[0].cells
    assert cell.notes == []
    oms = {o.om: o for o in cell.oms}
    assert set(oms) == {"om_ka", "om_ia", "om_perf", "om_gen", "om_train", "om_inf"}
    assert all(oms[om].sources == [source[new], source[dense]] for om in ("om_ka", "om_ia", "om_perf", "om_gen", "om_inf"))
    assert cell.compressed_eval.path == new.relative_to(tmp_path / "runs").as_posix()
    metrics = [(m.track, m.metric) for m in cell.metrics]
    assert len(metrics) == len(set(metrics)) and (2, "wikitext2_ppl") in metrics
    memory = next(m for m in cell.metrics if m.metric == "gpu_memory_gb")
    assert (memory.dense, memory.compressed) == (pytest.approx(22.97), pytest.approx(22.95))
    assert {m.compressed_source for m in cell.metrics} == {source[new]}
    # a later track-2-only evaluation takes track 2 over; tracks 1 and 4 stay with the 1,2,4 one
    dense2 = s.dense(LLAMA2, {"wikitext2_ppl": 5.0}, tracks=(2,))
    gen = s.evaluate(LLAMA2, comp, {"wikitext2_ppl": 6.0}, tracks=(2,))
    (cell,) = build_store_report(tmp_path / "runs").groups[0].cells
    oms = {o.om: o for o in cell.oms}
    assert cell.notes == [] and oms["om_gen"].value == pytest.approx(100 * 5.0 / 6.0)
    assert oms["om_gen"].sources == [f"{d.relative_to(tmp_path / 'runs').as_posix()}/result.json" for d in (gen, dense2)]
    assert oms["om_ka"].sources == oms["om_inf"].sources == [source[new], source[dense]]


def test_track2_across_models_is_table_2_with_om_gen(tmp_path):
    """Track 2 on three models: one table with a column per model and OM_gen as the RMS over
    the models of ppl_dense/ppl_c; a method measured on two of the three gets none."""
    other = ModelRef(name="opt-1.3b", source="hub", identity="hub:facebook/opt-1.3b@" + "0" * 40, path="/hf/opt")
    ppl = [(LLAMA2, 5.12, {"wanda": 6.46, "gptq": 5.60}), (EMBEDDED, 20.0, {"wanda": 25.0}),
           (other, 14.62, {"wanda": 18.41, "gptq": 15.0})]
    s = SyntheticStore(tmp_path / "runs")
    for model, dense_ppl, methods in ppl:
        s.dense(model, {"wikitext2_ppl": dense_ppl}, tracks=(2,))
        for method, value in methods.items():
            s.method(model, method, "p", {}, {"wikitext2_ppl": value}, 1.0, 1.0, tracks=(2,))
    write_store_report(tmp_path / "runs", tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text().splitlines()
    at = next(i for i, ln in enumerate(md) if ln.startswith("| method") and "OM_gen" in ln and "opt-1.3b" in ln)
    columns = [c.strip() for c in md[at].split("|")][1:-1]
    assert columns == ["method", "setting", "llama-2-7b-hf", "opt-1.3b", "smollm2-135m-instruct", "OM_gen"]
    rows = {r[0]: r for r in ([c.strip() for c in ln.split("|")][1:-1] for ln in md[at + 2:at + 5])}
    assert rows["dense"][2:5] == ["5.12", "14.62", "20.00"]
    expected = 100 * math.sqrt(sum((d / m["wanda"]) ** 2 for _, d, m in ppl) / 3)
    assert rows["wanda"][5] == f"{expected:.2f}" and rows["wanda"][2:5] == ["6.46", "18.41", "25.00"]
    assert rows["gptq"][4] == "-" and rows["gptq"][5] == "-"  # not on every model: no OM_gen over fewer


def _compress(s: SyntheticStore, engine: str, compress_s: float, memory_gb: float, seed: int = 0) -> JobRun:
    """A compress run of Wanda 50% on LLaMA-2-7B, as the bench that ran it holds it."""
    job = Job(kind="compress", method="wanda", preset="unstructured-50", params={"pattern": "unstructured", "sparsity": 0.5},
              engine=engine, model=LLAMA2, profile="paper", device="cuda", calibration=Calibration(nsamples=128, seqlen=2048, seed=seed))
    d = s._write(cell_name("wanda", "unstructured-50", LLAMA2.name), job,
                 {"track3": {"compress_s": compress_s, "compress_peak_rss_bytes": int(3e9),
                             "compress_peak_gpu_bytes": int(memory_gb * 1e9), "device": "cuda"}})
    return JobRun(job, d.name, d, Result.model_validate_json((d / "result.json").read_text()), cached=False)


@pytest.mark.parametrize("reverse", [False, True], ids=["sorted", "reversed"])
@pytest.mark.parametrize("engine", ["reference", "upstream"])
def test_a_bench_scores_track3_on_its_own_compress_run(tmp_path, monkeypatch, engine, reverse):
    """`bench --engine reference` beside an upstream run of the same preset, and a newer run of
    the same preset and engine (other calibration seed): OM_train and the track-3 figures are
    those of the bench's own run whatever order the store is read in, and the other engine is
    a peer of its own, named in brackets."""
    from types import SimpleNamespace

    from llmcbench.driver import store
    from llmcbench.driver.report import build_report

    s = SyntheticStore(tmp_path / "runs")
    runs = {"reference": _compress(s, "reference", 60.0, 14.0), "upstream": _compress(s, "upstream", 600.0, 12.0)}
    _compress(s, "reference", 30.0, 20.0, seed=1)  # newer, same key: a peer only of the upstream bench
    if reverse:
        results = store.Store.results
        monkeypatch.setattr(store.Store, "results", lambda self: list(results(self))[::-1])
    plan = SimpleNamespace(runs={"compress": runs[engine]}, runs_dir=tmp_path / "runs", model=LLAMA2,
                           method=SimpleNamespace(name="wanda"), setting="unstructured-50", tracks=[3], engine=engine,
                           profile=SimpleNamespace(name="paper"), device="cuda", data_source="hub")
    rep = build_report(plan)
    own_s, own_gb = (60.0, 14.0) if engine == "reference" else (600.0, 12.0)
    peers = {p["preset"]: p["compress_s"] for p in rep.track3_compared}
    assert peers == {"unstructured-50": 60.0 if engine == "reference" else 30.0, "unstructured-50 [upstream]": 600.0}
    assert rep.track3["compress_s"] == own_s
    t_max, m_max = 600.0, 14.0 if engine == "reference" else 20.0
    (om,) = [o for o in rep.oms if o.om == "om_train"]
    assert om.value == pytest.approx(math.sqrt(((t_max / own_s) ** 2 + (m_max / own_gb) ** 2) / 2))
    assert om.setting == ("unstructured-50" if engine == "reference" else "unstructured-50 [upstream]")


def _two_methods(tmp_path, **sparsegpt_kw) -> Path:
    s = SyntheticStore(tmp_path / "runs")
    s.dense(EMBEDDED, PAPER_DENSE, profile="quick")
    s.method(EMBEDDED, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.5}, PAPER_WANDA, 5, 1, profile="quick")
    s.method(EMBEDDED, "sparsegpt", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.5}, PAPER_WANDA, 9, 2,
             profile="quick", **sparsegpt_kw)
    return tmp_path / "runs"


def test_fairness_check_passes_identical_conditions(tmp_path):
    (group,) = build_store_report(_two_methods(tmp_path)).groups
    assert [c.method for c in group.cells] == ["sparsegpt", "wanda"]
    assert group.fairness_flags == []
    assert {c.fairness.calibration_sha256 for c in group.cells} == {CALIB_SHA}


def test_fairness_check_flags_different_calibration_data(tmp_path):
    runs = _two_methods(tmp_path, calib_sha="d" * 64, nsamples=64)
    report = write_store_report(runs, runs / "report")
    (group,) = report.groups
    assert group.fairness_flags == ["calibration_sha256", "calibration_nsamples"]
    md = (runs / "report" / "report.md").read_text()
    assert "⚠ calibration sha256" in md and "**⚠ dddddddddddd**" in md and "**⚠ cccccccccccc**" in md
    html = (runs / "report" / "report.html").read_text()
    assert '<th class="flag">calibration sha256</th>' in html and '<th class="flag">nsamples</th>' in html
    assert "differs between the compared methods (flagged): calibration sha256, nsamples" in html


def test_fairness_check_flags_image_digest_and_runner(tmp_path):
    (group,) = build_store_report(_two_methods(tmp_path, image_digest="sha256:" + "1" * 64)).groups
    assert {"runner", "image", "image_digest"} <= set(group.fairness_flags)


def test_untrusted_and_failed_runs_are_listed_not_scored(llama_store):
    run = _eval_result(llama_store, "wanda-2-4-*")
    data = json.loads(run.read_text())
    data["metrics"]["track1"]["tasks"]["mmlu"]["accuracy_pct"] = 99.0  # edited by hand: the seal breaks
    run.write_text(json.dumps(data))
    report = build_store_report(llama_store)
    (problem,) = report.problems
    assert problem.status == "untrusted" and problem.path == run.relative_to(llama_store).as_posix()
    assert "checksum mismatch" in problem.message
    cell = next(c for c in report.groups[0].cells if c.setting == "2:4")
    assert cell.compressed_eval is None and not any(o.track == 1 for o in cell.oms)
    assert cell.notes == ["no evaluation of this artifact in the store: tracks 1 and 4 not scored"]


def _failed_run(store: SyntheticStore, job: Job, env: str) -> Path:
    """A run of `job` under other code (`env`: another job hash) that crashed, as the job process records it."""
    from llmcbench.driver.contract import ErrorInfo

    h = job.job_hash(env)
    d = store.root / cell_name(job.method, job.preset, LLAMA2.name) / h
    write_record(d / "job.json", job)
    write_atomic(d / "log.txt", "Traceback: boom\n")
    result = Result(job_hash=h, status="failed", started_at=store._time(), finished_at=store._time(), wall_s=1.0,
                    environment=Environment(python="3.11"), provenance=Provenance(runner="local"),
                    input_sha256={"job.json": sha256_file(d / "job.json")},
                    error=ErrorInfo(type="crash", message="RuntimeError: boom")).sealed()
    write_record(d / "result.json", result)
    return d


def test_a_later_failed_run_of_a_cell_is_said_beside_its_figures(tmp_path):
    """The code changed and the cell's new compress run (or a new evaluation of its artifact) failed:
    the row still shows the earlier runs' figures, and says so, or the latest attempt's failure
    would be visible only in the problems list, far from the numbers it puts in doubt."""
    s = SyntheticStore(tmp_path)
    s.dense(LLAMA2, PAPER_DENSE)
    comp, ev = s.method(LLAMA2, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.5},
                        wanda_values(), 60.0, 14.0)
    cell = build_store_report(tmp_path).groups[0].cells[0]
    assert cell.notes == [] and any(o.track == 1 for o in cell.oms)

    failed = _failed_run(s, Job.model_validate_json((comp / "job.json").read_text()), "changed-code")
    report = build_store_report(tmp_path)
    cell = report.groups[0].cells[0]
    assert cell.compress.path == comp.relative_to(tmp_path).as_posix() and any(o.track == 1 for o in cell.oms)
    (note,) = cell.notes
    assert note.startswith("a later compress run of this cell failed") and "crash" in note
    assert failed.relative_to(tmp_path).as_posix() in note
    assert [p.status for p in report.problems] == ["failed"]
    write_store_report(tmp_path, tmp_path / "report")
    assert "a later compress run of this cell failed" in (tmp_path / "report" / "report.md").read_text()

    _failed_run(s, Job.model_validate_json((ev / "job.json").read_text()), "changed-code")
    notes = build_store_report(tmp_path).groups[0].cells[0].notes
    assert len(notes) == 2 and notes[1].startswith("a later eval of this artifact for tracks 1, 4 failed")

    # a track group that never succeeded: track 6 failed before the (older) tracks 1/4 evaluation was
    # rerun, so it is not "later" than what is shown, but nothing shown answers it either
    six = Job.model_validate_json((ev / "job.json").read_text())
    six = six.model_copy(update={"evaluation": EvalSettings(tracks=[6])})
    _failed_run(s, six, "changed-code")
    s.evaluate(LLAMA2, comp, wanda_values())
    notes = build_store_report(tmp_path).groups[0].cells[0].notes
    assert not any(n.startswith("a later eval of this artifact for tracks 1, 4") for n in notes), notes  # mended
    assert any(n.startswith("the eval of this artifact for track 6 failed") for n in notes), notes


def test_an_earlier_failed_run_is_no_note(tmp_path):
    """A failure that a later run of the same cell mended is only a problem of the store."""
    s = SyntheticStore(tmp_path)
    s.dense(LLAMA2, PAPER_DENSE)
    params = {"pattern": "unstructured", "sparsity": 0.5}
    job = Job(kind="compress", method="wanda", preset="unstructured-50", params=params, model=LLAMA2, profile="paper",
              device="cuda", calibration=Calibration(nsamples=128, seqlen=2048, seed=0))
    _failed_run(s, job, "older-code")
    comp, _ = s.method(LLAMA2, "wanda", "unstructured-50", params, wanda_values(), 60.0, 14.0)
    assert Job.model_validate_json((comp / "job.json").read_text()) == job  # the same cell, mended by the later run
    report = build_store_report(tmp_path)
    assert report.groups[0].cells[0].notes == [] and [p.status for p in report.problems] == ["failed"]


# ---------------------------------------------------------------- the report files


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.number_cells = 0
        self.unlinked_numbers: list[str] = []
        self._in_number: list[bool] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "href" in a:
            self.hrefs.append(a["href"])
        if "src" in a:
            self.srcs.append(a["src"])
        if tag == "td":
            self._in_number.append("n" in (a.get("class") or "").split())
            self._linked = False
        if tag == "a" and self._in_number and self._in_number[-1]:
            self._linked = True

    def handle_data(self, data):
        if self._in_number and self._in_number[-1] and data.strip() and not getattr(self, "_linked", False):
            self.unlinked_numbers.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._in_number:
            self.number_cells += self._in_number.pop()


def test_html_is_self_contained_and_every_number_links_to_its_source(llama_store):
    out = llama_store / "report"
    write_store_report(llama_store, out)
    text = (out / "report.html").read_text()
    page = _Page()
    page.feed(text)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert page.tags.count("table") >= 7 and page.tags.count("img") >= 2
    assert "http://" not in text and "https://" not in text and not [h for h in page.hrefs if ":" in h or h.startswith("/")]
    for src in page.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    files = [h for h in page.hrefs if not h.startswith("#")]
    assert sum(h.endswith("/result.json") for h in files) > 50
    assert [h for h in files if not (out / h).is_file()] == []  # no broken link
    assert page.number_cells > 50 and page.unlinked_numbers == []
    assert "profile paper" in text and "Compare with paper" in text and "Fairness check" in text
    assert "Track 5 (hardware acceleration, Table 5 layout, Fig. 3): no deploy results in this store." in text
    md = (out / "report.md").read_text()
    assert "Profile of these results: paper:" in md and "| wanda | 2:4 |" in md


def test_report_is_a_pure_function_of_the_store(llama_store, tmp_path):
    a = write_store_report(llama_store, tmp_path / "a")
    b = write_store_report(llama_store, tmp_path / "b")
    assert a == b
    for name in ("report.json", "report.md", "report.html"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_deploy_and_trust_results_get_their_table_and_figures():
    from llmcbench.driver.reporting import plots
    from llmcbench.driver.reporting.schema import GroupReport, MetricCell
    from llmcbench.driver.reporting.tables import track5_table

    report_group = GroupReport.model_validate(json.loads(json.dumps(_minimal_group())))
    cell = report_group.cells[0]
    cell.metrics = [MetricCell(track=5, metric=lib, label=lib, unit="tokens/s", dense=100.0, compressed=v, ratio=v / 100,
                               dense_source="d/result.json", compressed_source="c/result.json")
                    for lib, v in (("vllm", 120.0), ("tensorrt_llm", 150.0))]
    cell.metrics += [MetricCell(track=6, metric=m, label=m, unit="%", dense=60.0, compressed=55.0, ratio=55 / 60,
                                dense_source="d/result.json", compressed_source="c/result.json")
                     for m in ("advglue_sst2", "truthfulqa_mc1")]
    table = track5_table(report_group)
    assert table.columns[2:] == ["TensorRT-LLM", "vLLM", "OM_hard"]
    assert plots.fig_tokens_per_s(report_group)[:4] == b"\x89PNG"
    assert plots.fig_trust(report_group)[:4] == b"\x89PNG"


def test_a_track_table_has_a_dense_row_per_baseline_its_ratios_used():
    """Track 6's baseline is a job of its own: two cells with one main dense evaluation can have
    been scored against two track-6 dense runs (rerun between their benches), and a cell can have
    one with no main dense at all. Each baseline is a row, with its values; one shared is one row."""
    from llmcbench.driver.reporting.schema import GroupReport, MetricCell
    from llmcbench.driver.reporting.tables import track1_table, track6_table

    def t6(dense_run, dense):
        return [MetricCell(track=6, metric=m, label=m, unit="%", dense=dense, compressed=50.0, ratio=50 / dense,
                           dense_source=f"dense/{dense_run}/result.json", compressed_source="c/result.json")
                for m in ("advglue_sst2", "truthfulqa_mc1")]

    group = _minimal_group()
    group["cells"] = [dict(group["cells"][0], setting=s) for s in ("a", "b", "c")]
    g = GroupReport.model_validate(json.loads(json.dumps(group)))
    main = {"kind": "eval", "job_hash": "d1d1d1d1d1", "path": "dense/d1d1d1d1d1", "finished_at": "t"}
    for c in g.cells[:2]:
        c.dense_eval = type(g.cells[0].compress).model_validate(main)
    g.cells[0].metrics = t6("aaaaaaaaaa", 60.0)
    g.cells[1].metrics = t6("bbbbbbbbbb", 62.0)
    g.cells[2].metrics = t6("aaaaaaaaaa", 60.0)[:1]  # a subset of cell a's baselines: no row of its own
    table = track6_table(g)
    dense_rows = [r for r in table.rows if r[0].text.startswith("dense")]
    assert [r[0].text for r in dense_rows] == ["dense (aaaaaaaa)", "dense (bbbbbbbb)"]
    assert [[c.text for c in r[2:4]] for r in dense_rows] == [["60.00", "60.00"], ["62.00", "62.00"]]
    assert dense_rows[1][-1].source == "dense/bbbbbbbbbb/result.json"
    assert track1_table(g) is None  # no track-1 metric: no table, and no dense row of another track's runs

    g.cells[1].metrics = t6("aaaaaaaaaa", 60.0)
    assert [r[0].text for r in track6_table(g).rows if r[0].text.startswith("dense")] == ["dense"]


def _minimal_group() -> dict:
    ref = {"kind": "compress", "job_hash": "h", "path": "c", "finished_at": "t"}
    fairness = {k: None for k in ("calibration_dataset", "calibration_sha256", "calibration_nsamples", "calibration_seqlen",
                                  "calibration_seed", "image", "image_digest", "evaluation", "dense_baseline", "environment")}
    fairness.update(engine="reference", runner="local", profile="quick", device="cpu", dtype="float32", source="c/result.json")
    cell = {"method": "wanda", "preset": "2:4", "setting": "2:4", "engine": "reference", "params": {}, "compress": ref,
            "compressed_eval": None, "dense_eval": None, "metrics": [], "oms": [], "fairness": fairness,
            "track3": {"compress_s": 1.0, "peak_memory_gb": 1.0, "memory_kind": "host_rss", "device": "cpu", "source": "c/result.json"}}
    return {"model": "m", "model_identity": "sha256:x", "profile": "quick", "paper_model": None, "cells": [cell], "fairness_flags": []}


# ---------------------------------------------------------------- bundle and verify


@pytest.fixture(scope="module")
def bundled_store(tmp_path_factory) -> tuple[Path, bytes]:
    """One bundle of the LLaMA store, built once; each test tampers with its own copy."""
    base = tmp_path_factory.mktemp("bundled")
    store = write_llama_store(base / "runs")
    digest, warnings, n = make_bundle(store, base / "bundle.tar.gz")
    assert warnings == [] and n == 5 and len(digest) == 64
    return store, (base / "bundle.tar.gz").read_bytes()


@pytest.fixture
def bundle(bundled_store, tmp_path) -> Path:
    path = tmp_path / "bundle.tar.gz"
    path.write_bytes(bundled_store[1])
    return path


def _unpack(bundle: Path, dest: Path) -> Path:
    with tarfile.open(bundle) as tar:
        for m in tar.getmembers():
            target = dest / m.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(m).read())
    return dest / TOP


def _repack(root: Path, bundle: Path, remanifest: bool = False) -> None:
    if remanifest:  # the attacker also rewrites the manifest
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
        (root / MANIFEST).write_text("".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files))
    bundle.write_bytes(_targz(root))


def _eval_result(root: Path, cell_pattern: str) -> Path:
    """The result.json of the cell's evaluation (the run dir without a model/)."""
    (path,) = [p for p in root.glob(f"{cell_pattern}/*/result.json") if not (p.parent / "model").exists()]
    return path


def _run(root: Path, pattern: str) -> Path:
    (path,) = list(root.glob(pattern))
    return path


def test_bundle_holds_records_not_weights(bundle, tmp_path):
    root = _unpack(bundle, tmp_path / "x")
    names = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert not [n for n in names if n.endswith(".safetensors")]
    assert {"MANIFEST.sha256", "reproduce.sh", "environment.json", "artifacts.json", "report/report.html",
            "report/report.md", "report/report.json"} <= names
    assert sum(n.endswith("/result.json") for n in names) == 5 and sum(n.endswith("/compression.json") for n in names) == 2
    artifacts = json.loads((root / "artifacts.json").read_text())
    comp = _run(root, "runs/wanda-unstructured-50-*/*/model/compression.json").parent.parent
    result = json.loads((comp / "result.json").read_text())
    key = f"{comp.relative_to(root).as_posix()}/model/model.safetensors"
    assert artifacts[key] == result["output_sha256"]["model/model.safetensors"]
    manifest = dict(reversed(line.split("  ", 1)) for line in (root / MANIFEST).read_text().splitlines())
    assert set(manifest) == names - {MANIFEST}
    assert all(sha256_file(root / n) == h for n, h in manifest.items())
    script = (root / "reproduce.sh").read_text()
    assert ("HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 llmcbench bench --method wanda --preset unstructured-50 "
            "--model meta-llama/Llama-2-7b-hf --sparsity 0.5 --tracks 1,3,4 --profile paper --engine reference "
            "--runner local --device cuda --runs-dir runs") in script
    assert "--preset 2:4" in script and script.rstrip().endswith("llmcbench report runs -o runs/report")


def test_bundle_is_reproducible(bundled_store, tmp_path, bundle):
    again = tmp_path / "again.tar.gz"
    make_bundle(bundled_store[0], again)
    assert again.read_bytes() == bundle.read_bytes()


def test_verify_passes_a_clean_bundle(bundle, run_cli):
    problems, summary = verify_bundle(bundle)
    assert problems == []
    assert summary["oms"] == 2 * 5 and summary["results"] == 5
    digest = hashlib.sha256(_manifest_text(bundle).encode()).hexdigest()
    assert summary["digest"] == digest
    proc = run_cli("verify", str(bundle), "--expect-digest", digest)
    assert proc.returncode == 0 and proc.stdout.startswith("ok:"), proc.stdout + proc.stderr


def _manifest_text(bundle: Path) -> str:
    with tarfile.open(bundle) as tar:
        return tar.extractfile(f"{TOP}/{MANIFEST}").read().decode()


def _reseal_with_metric(result_path: Path, dataset: str, value: float) -> None:
    result = Result.model_validate_json(result_path.read_text())
    result.metrics["track1"]["tasks"][dataset]["accuracy_pct"] = value
    result_path.write_text(result.sealed().model_dump_json(indent=2))


def test_verify_catches_a_modified_metric_even_resealed(bundle, tmp_path, run_cli):
    root = _unpack(bundle, tmp_path / "x")
    target = _eval_result(root, "runs/wanda-unstructured-50-*")
    _reseal_with_metric(target, "mmlu", 40.0)  # the seal is valid again: the manifest is what catches it
    _repack(root, bundle)
    rel = target.relative_to(root).as_posix()
    problems, _ = verify_bundle(bundle)
    assert f"{rel}: sha256 does not match MANIFEST.sha256 (modified)" in problems
    assert any(p.startswith("report/report.json: om_ka of wanda unstructured-50 on llama-2-7b-hf (paper) is ") for p in problems)
    proc = run_cli("verify", str(bundle))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].endswith(f"problem(s) in {bundle}") and len(lines) == len(problems) + 1
    assert any(rel in line for line in lines)


def test_verify_rescoring_catches_a_resealed_metric_with_a_rewritten_manifest(bundle, tmp_path):
    root = _unpack(bundle, tmp_path / "x")
    target = _eval_result(root, "runs/wanda-2-4-*")
    _reseal_with_metric(target, "arc_e", 70.0)
    _repack(root, bundle, remanifest=True)
    problems, summary = verify_bundle(bundle)
    assert not [p for p in problems if "MANIFEST" in p]
    assert {p.split(" is ")[0] for p in problems if p.startswith("report/report.json: om_")} == {
        "report/report.json: om_ka of wanda 2:4 on llama-2-7b-hf (paper)", "report/report.json: om_perf of wanda 2:4 on llama-2-7b-hf (paper)"}
    assert "report/report.md: does not match the report re-derived from the raw results (edited, or built by another llmcbench)" in problems
    assert verify_bundle(bundle, expect_digest=hashlib.sha256(_manifest_text(bundle).encode()).hexdigest())[0] == problems
    original = hashlib.sha256(b"the digest the author published").hexdigest()
    assert any(p.startswith("MANIFEST.sha256: bundle digest") for p in verify_bundle(bundle, expect_digest=original)[0])


def test_verify_rederives_the_pages(bundle, tmp_path):
    root = _unpack(bundle, tmp_path / "x")
    page = root / "report" / "report.html"
    html = page.read_text()
    assert html.count(">84.62</a>") >= 2 and ">89.62</a>" not in html  # om_ka of Wanda 50%
    page.write_text(html.replace(">84.62</a>", ">89.62</a>", 1))
    md = root / "report" / "report.md"
    md.write_text(md.read_text().replace("| wanda | 2:4 |", "| wanda | 2:4 (better) |"))
    _repack(root, bundle, remanifest=True)
    problems, _ = verify_bundle(bundle)
    assert problems == [
        "report/report.md: does not match the report re-derived from the raw results (edited, or built by another llmcbench)",
        "report/report.html: its text does not match the report re-derived from the raw results (edited, or built by another llmcbench)"]


def test_verify_names_a_removed_file(bundle, tmp_path):
    root = _unpack(bundle, tmp_path / "x")
    log = _run(root, "runs/dense-*/*/log.txt")
    log.unlink()
    (root / "report" / "report.html").unlink()
    _repack(root, bundle)
    problems, _ = verify_bundle(bundle)
    assert sorted(problems) == ["report/report.html: listed in MANIFEST.sha256 but missing from the bundle (removed)",
                                f"{log.relative_to(root).as_posix()}: listed in MANIFEST.sha256 but missing from the bundle (removed)"]


def test_verify_names_a_removed_result(bundle, tmp_path):
    root = _unpack(bundle, tmp_path / "x")
    result = _run(root, "runs/dense-*/*/result.json")
    result.unlink()
    _repack(root, bundle, remanifest=True)
    problems, _ = verify_bundle(bundle)
    rel = result.parent.relative_to(root).as_posix()
    assert f"{rel}/result.json: missing" in problems
    assert any(p.startswith("report/report.json: states om_ka of wanda") and p.endswith("which the raw results do not give") for p in problems)


@pytest.mark.parametrize("remanifest", [False, True])
def test_verify_catches_artifacts_swapped_between_cells(bundle, tmp_path, remanifest):
    root = _unpack(bundle, tmp_path / "x")
    a = _run(root, "runs/wanda-unstructured-50-*/*/model/compression.json")
    b = _run(root, "runs/wanda-2-4-*/*/model/compression.json")
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    _repack(root, bundle, remanifest=remanifest)
    problems, _ = verify_bundle(bundle)
    for f in (a, b):
        rel = f.relative_to(root).as_posix()
        if remanifest:
            assert f"{rel}: does not match the sha256 its result.json recorded (swapped or modified)" in problems
        else:
            assert f"{rel}: sha256 does not match MANIFEST.sha256 (modified)" in problems


def test_verify_catches_results_swapped_between_cells(bundle, tmp_path):
    root = _unpack(bundle, tmp_path / "x")
    a = _run(root, "runs/wanda-unstructured-50-*/*/model").parent / "result.json"
    b = _run(root, "runs/wanda-2-4-*/*/model").parent / "result.json"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    _repack(root, bundle, remanifest=True)
    problems, _ = verify_bundle(bundle)
    for f in (a, b):
        rel = f.relative_to(root).as_posix()
        assert any(p.startswith(f"{rel}: belongs to job ") and p.endswith("(swapped)") for p in problems), problems


def test_verify_refuses_unsafe_archive_members(bundle, tmp_path):
    root = _unpack(bundle, tmp_path / "x")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=f"{TOP}/{p.relative_to(root).as_posix()}")
        evil = tarfile.TarInfo("../evil.sh")
        evil.size = 3
        tar.addfile(evil, io.BytesIO(b"bad"))
    bundle.write_bytes(raw.getvalue())
    problems, _ = verify_bundle(bundle)
    assert problems == ["../evil.sh: unsafe path in the archive, not extracted"]
    assert not (tmp_path / "evil.sh").exists()


def test_cli_errors_are_one_line(tmp_path, run_cli):
    proc = run_cli("report", str(tmp_path / "nope"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: store") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    proc = run_cli("verify", str(tmp_path / "junk.tar.gz"))
    assert proc.returncode == 2 and "not a readable tar.gz" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nope").exists()


def test_report_and_bundle_take_the_store_as_bench_does(tmp_path, run_cli):
    """`--runs-dir`, as bench and matrix take it, or the argument, or runs/ in the working dir."""
    write_llama_store(tmp_path / "runs")
    pages = []
    for args in (["runs"], ["--runs-dir", "runs"], []):
        proc = run_cli("report", *args, "-o", f"out{len(pages)}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        pages.append((tmp_path / f"out{len(pages)}" / "report.md").read_text())
    assert pages[0] == pages[1] == pages[2] and "unstructured-50" in pages[0]
    proc = run_cli("bundle", "--runs-dir", "runs", "-o", "b.tar.gz", cwd=tmp_path)
    assert proc.returncode == 0 and "bundle: b.tar.gz (5 runs)" in proc.stdout, proc.stderr
    for verb in ("report", "bundle"):
        proc = run_cli(verb, "runs", "--runs-dir", "elsewhere", cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.strip() == "error: two stores given (runs and --runs-dir elsewhere): pass one"


def test_bundle_and_verify_refuse_what_is_not_there(tmp_path):
    from llmcbench.driver.reporting.bundle import BundleError

    with pytest.raises(BundleError, match="does not exist"):
        make_bundle(tmp_path / "nope", tmp_path / "b.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no trusted ok result"):
        make_bundle(tmp_path / "empty", tmp_path / "b.tar.gz")
    with pytest.raises(BundleError, match="does not exist"):
        verify_bundle(tmp_path / "nope.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()


def test_bundle_verbs_name_a_file_for_a_directory_and_the_reverse(tmp_path, run_cli):
    """Each a one-line error that says which it is (a directory given as the bundle to write
    was a traceback after the whole bundle was built; a file given as the store "did not exist")."""
    write_llama_store(tmp_path / "runs")
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("x")
    for args, message in ((["bundle", "runs", "-o", "out"], "error: --out out is a directory: name the bundle file (e.g. out/bundle.tar.gz)"),
                          (["bundle", "file"], "error: store file is not a directory: pass the --runs-dir of your benches"),
                          (["report", "file"], "error: store file is not a directory"),
                          (["verify", "out"], "error: out is not a file: pass the .tar.gz that `llmcbench bundle` wrote"),
                          (["bundle", "runs", "-o", "file/b.tar.gz"], "error: cannot write the bundle file/b.tar.gz")):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith(message) and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [] and not list(tmp_path.glob(".*tmp"))


# ---------------------------------------------------------------- what a store may hold that a bundle must not trust


def _judged_store(root: Path, mean_a: float = 3.0, compressed_job: str | None = None) -> tuple[Path, Path]:
    """The LLaMA store plus a track-7 evaluation of dense and of Wanda 50% and the judgement of
    the pair, sealed as `judge_bench` writes it. Returns (store, the judge.json)."""
    from llmcbench.driver.judging import JUDGE_FILE, seal_judgement

    store = write_llama_store(root)
    s = SyntheticStore(store)
    s.clock = 500
    t7 = {"track7": {"tasks": {}, "generations": {}}}
    dense = s._write("dense-llama-2-7b-hf", Job(kind="eval", method="dense", model=LLAMA2, evaluation=EvalSettings(tracks=[7]),
                                                profile="paper", device="cuda"), t7)
    comp = _run(store, "wanda-unstructured-50-*/*/model").parent
    artifact = ModelRef(name="model", source="artifact", identity=f"artifact:{comp.name}", path=str(comp / "model"))
    ev = s._write(comp.parent.name, Job(kind="eval", method="wanda", preset="unstructured-50", model=artifact,
                                         evaluation=EvalSettings(tracks=[7]), profile="paper", device="cuda"), t7)
    identity = {"compressed_job": compressed_job or ev.name, "dense_job": dense.name}
    write_atomic(ev / JUDGE_FILE, json.dumps(seal_judgement({"identity": identity, "metric": "kick_instruction",
                                                             "mean_a": mean_a, "mean_b": 4.0})))
    return store, ev / JUDGE_FILE


def _kick(report) -> list[float]:
    return [m.compressed for g in report.groups for c in g.cells for m in c.metrics if m.metric == "kick_instruction"]


def test_a_judgement_is_bundled_and_sealed(tmp_path):
    store, judge = _judged_store(tmp_path / "runs")
    assert _kick(build_store_report(store)) == [75.0]
    digest, warnings, n = make_bundle(store, tmp_path / "b.tar.gz")
    assert warnings == [] and n == 7
    root = _unpack(tmp_path / "b.tar.gz", tmp_path / "x")
    bundled = root / judge.relative_to(store.parent)
    assert bundled.read_bytes() == judge.read_bytes()  # carried, under the manifest
    assert _kick(build_store_report(root / "runs")) == [75.0] and verify_bundle(tmp_path / "b.tar.gz", digest)[0] == []
    # edited in the bundle, the manifest rewritten too: its seal names it
    bundled.write_text(bundled.read_text().replace('"mean_a": 3.0', '"mean_a": 4.0'))
    _repack(root, tmp_path / "b.tar.gz", remanifest=True)
    rel = bundled.relative_to(root).as_posix()
    assert f"{rel}: checksum mismatch (edited, corrupted, or written unsealed)" in verify_bundle(tmp_path / "b.tar.gz")[0]
    # edited in the store: the run is not trusted, so never scored with the edited figure
    judge.write_text(judge.read_text().replace('"mean_a": 3.0', '"mean_a": 4.0'))
    report = build_store_report(store)
    assert _kick(report) == [] and [p.message for p in report.problems] == [
        "judge.json: checksum mismatch (edited, corrupted, or written unsealed)"]


def test_a_judgement_of_another_job_is_not_trusted(tmp_path):
    store, judge = _judged_store(tmp_path / "runs", compressed_job="f" * 64)  # sealed, but copied from another run
    report = build_store_report(store)
    assert _kick(report) == [] and [p.message for p in report.problems] == ["judge.json: judges job ffffffffffff, not this run's"]
    _, warnings, _ = make_bundle(store, tmp_path / "b.tar.gz")
    assert warnings == [f"left out {judge.parent.relative_to(store).as_posix()}: untrusted: judge.json: judges job ffffffffffff, not this run's"]


@pytest.mark.parametrize("damage", ["removed", "modified"])
def test_a_run_whose_artifact_is_gone_is_not_bundled(tmp_path, damage):
    store = write_llama_store(tmp_path / "runs")
    comp = _run(store, "wanda-2-4-*/*/model").parent
    weights = comp / "model" / "model.safetensors"
    weights.unlink() if damage == "removed" else weights.write_bytes(b"other weights")
    why = ("model/model.safetensors is missing: its result.json records it as an output" if damage == "removed"
           else "model/model.safetensors does not match the sha256 its result.json recorded")
    assert [(p.path, p.message) for p in build_store_report(store).problems] == [(comp.relative_to(store).as_posix(), why)]
    digest, warnings, n = make_bundle(store, tmp_path / "b.tar.gz")
    evaluation = _eval_result(store, "wanda-2-4-*").parent
    assert warnings == [f"left out {comp.relative_to(store).as_posix()}: untrusted: {why}",
                        f"left out {evaluation.relative_to(store).as_posix()}: evaluates artifact {comp.name[:12]}, "
                        "whose compress run is not bundled"]
    assert n == 3 and verify_bundle(tmp_path / "b.tar.gz", digest)[0] == []


@pytest.mark.parametrize("link", ["log.txt", "run dir"])
def test_a_bundle_never_follows_a_symlink_out_of_the_store(tmp_path, link):
    store = write_llama_store(tmp_path / "runs")
    secret = tmp_path / "host-secret.txt"
    secret.write_text("HOST SECRET outside the store\n")
    run = _run(store, "dense-*/*")
    if link == "log.txt":  # what a job can do to its own /out
        (run / "log.txt").unlink()
        (run / "log.txt").symlink_to(secret)
    else:  # the run dir itself, elsewhere
        elsewhere = tmp_path / "elsewhere"
        run.rename(elsewhere)
        (elsewhere / "log.txt").write_text(secret.read_text())
        run.symlink_to(elsewhere, target_is_directory=True)
    digest, warnings, n = make_bundle(store, tmp_path / "b.tar.gz")
    assert len(warnings) == 1 and warnings[0].startswith(f"left out {run.relative_to(store).as_posix()}: untrusted: ")
    assert "a symbolic link or outside the store" in warnings[0]
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        assert not [m.name for m in tar.getmembers() if m.isfile() and b"HOST SECRET" in tar.extractfile(m).read()]
    assert n == 4 and verify_bundle(tmp_path / "b.tar.gz", digest)[0] == []


def test_store_results_trust_what_the_report_trusts(llama_store):
    """A bench's track-3 peers (`Store.results`) are never a run its report rejects."""
    import shutil

    from llmcbench.driver.reporting.build import scan_store
    from llmcbench.driver.store import Store

    edited = _run(llama_store, "wanda-unstructured-50-*/*/model").parent
    job = json.loads((edited / "job.json").read_text())
    job["method"] = "sparsegpt"  # the result's job.json sha256 no longer matches
    (edited / "job.json").write_text(json.dumps(job))
    other = _run(llama_store, "wanda-2-4-*/*/model").parent
    shutil.copytree(other, other.parent / ("f" * 64))  # a result in another job's dir
    trusted, problems = scan_store(llama_store)
    assert len(problems) == 2
    assert sorted(d.relative_to(llama_store).as_posix() for _, _, d in Store(llama_store).results()) == sorted(r.path for r in trusted)


def test_bundle_prints_the_digest_verify_expects(tmp_path, run_cli):
    import re
    import shlex

    write_llama_store(tmp_path / "runs")
    proc = run_cli("bundle", "runs", "-o", "b.tar.gz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (suggested,) = re.findall(r"`(llmcbench verify [^`]*)`", proc.stdout.replace("\n", ""))
    proc = run_cli(*shlex.split(suggested)[1:], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("ok:"), proc.stdout + proc.stderr


def test_plots_draw_nothing_for_what_was_not_measured(monkeypatch):
    """Fig. 3: a cell without a dense deploy zeroed the dense bar another cell had measured, and a
    library a method was not deployed on was a 0 tokens/s bar; the radar drew an OM that was not
    scored at 0, the worst value. Missing is left out (or a gap), never 0."""
    import copy

    import matplotlib
    import matplotlib.axes

    from llmcbench.driver.reporting import plots
    from llmcbench.driver.reporting.schema import GroupReport, MetricCell, OMCell

    g = _minimal_group()
    other = copy.deepcopy(g["cells"][0])
    other["preset"] = other["setting"] = "unstructured-50"
    g["cells"].append(other)
    group = GroupReport.model_validate(g)
    a, b = group.cells

    def tps(lib, dense, comp):
        return MetricCell(track=5, metric=lib, label=lib, unit="tokens/s", dense=dense, compressed=comp,
                          ratio=comp / dense if dense else None, dense_source="d/result.json" if dense else None,
                          compressed_source="c/result.json")

    a.metrics, b.metrics = [tps("vllm", 100.0, 120.0), tps("torch_native", 50.0, 60.0)], [tps("vllm", None, 130.0)]
    seen = {}
    monkeypatch.setattr(plots, "fig_grouped_bars", lambda title, ylabel, series: seen.setdefault("series", series) and b"")
    plots.fig_tokens_per_s(group)
    assert seen["series"]["dense"] == {"vllm": 100.0, "torch_native": 50.0}
    assert "torch_native" not in seen["series"][plots._label(b)]
    monkeypatch.undo()
    heights = []
    real_bar = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, h, *args, **kw: (heights.append(list(h)), real_bar(self, x, h, *args, **kw))[1])
    plots.fig_grouped_bars("t", "y", {"dense": {"vllm": 100.0, "torch_native": 50.0}, "m": {"vllm": 130.0}})
    assert 0.0 not in [v for hs in heights for v in hs]

    a.oms = [OMCell(track=1, om=o, value=v, n_cells=1, sources=["x"]) for o, v in (("om_ka", 90.0), ("om_ia", 95.0), ("om_inf", 150.0))]
    b.oms = [OMCell(track=1, om=o, value=v, n_cells=1, sources=["x"]) for o, v in (("om_ka", 80.0), ("om_ia", 85.0))]
    traces = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *args, **kw: (traces.append((kw.get("label"), list(args[1]))), real_plot(self, *args, **kw))[1])
    plots.fig_radar(group)
    b_trace = next(r for label, r in traces if label == plots._label(b))
    assert 0.0 not in b_trace and any(math.isnan(v) for v in b_trace)


def test_track3_compares_runs_on_one_kind_of_device(tmp_path):
    """A CUDA Wanda run (60 s, 14 GB of GPU memory) and a CPU SparseGPT run (600 s, 3 GB of host
    memory) of one model: each is scored among the runs on its own kind of device, as a bench
    scores it (it had OM_train 7.11 and 3.37 from each other's time and memory)."""
    from llmcbench.driver.contract import Calibration, Compression, Job
    from llmcbench.driver.store import cell_name

    s = SyntheticStore(tmp_path / "runs")
    s.method(LLAMA2, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.5}, {}, 60.0, 14.0, tracks=())
    job = Job(kind="compress", method="sparsegpt", preset="unstructured-50", params={}, model=LLAMA2, profile="paper",
              device="cpu", calibration=Calibration(nsamples=128, seqlen=2048, seed=0))
    s._write(cell_name("sparsegpt", "unstructured-50", LLAMA2.name), job,
             {"track3": {"compress_s": 600.0, "compress_peak_rss_bytes": int(3e9), "compress_peak_gpu_bytes": None, "device": "cpu"}},
             inputs={"calibration": CALIB_SHA},
             model_files={"compression.json": Compression(method="sparsegpt", preset="unstructured-50",
                                                          sparsity_pattern="unstructured", measured_sparsity=0.5).model_dump_json()})
    (group,) = build_store_report(tmp_path / "runs").groups
    om_train = {c.method: next(o.value for o in c.oms if o.om == "om_train") for c in group.cells}
    assert om_train == {"wanda": pytest.approx(1.0), "sparsegpt": pytest.approx(1.0)}  # each alone on its device


def test_the_track2_models_table_scores_each_row_against_its_own_dense_and_keeps_revisions_apart(tmp_path):
    """Table 2's layout: a row's OM_gen is the RMS of its own cells' ppl_dense/ppl_c (it was
    re-scored against the first cell's dense of each model), and two revisions of one hub model
    are two columns (keyed by name, the later overwrote the earlier)."""
    from llmcbench.driver.reporting.tables import track2_models_table

    s = SyntheticStore(tmp_path / "runs")
    other = LLAMA2.model_copy(update={"identity": LLAMA2.identity.rsplit("@", 1)[0] + "@" + "b" * 40})
    for model, dense, comp in ((LLAMA2, 5.0, 6.0), (EMBEDDED, 20.0, 25.0), (other, 7.0, 9.0)):
        s.dense(model, {"wikitext2_ppl": dense}, tracks=(2,))
        s.method(model, "wanda", "unstructured-50", {"pattern": "unstructured", "sparsity": 0.5},
                 {"wikitext2_ppl": comp}, 5.0, 1.0, tracks=(2,))
    table = track2_models_table(build_store_report(tmp_path / "runs"), "paper")
    names = [c for c in table.columns[2:-1]]
    assert len(names) == 3 and len(set(names)) == 3 and sum(n.startswith("llama-2-7b-hf") for n in names) == 2
    row = next(r for r in table.rows if r[0].text == "wanda")
    expected = 100 * math.sqrt(((5 / 6) ** 2 + (20 / 25) ** 2 + (7 / 9) ** 2) / 3)
    assert float(row[-1].text) == pytest.approx(expected, abs=0.005)
    assert sorted(float(c.text) for c in row[2:-1]) == [6.0, 9.0, 25.0]
