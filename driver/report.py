"""The bench report: dense vs compressed per dataset, per-track figures, and the OMs.

Built only from the store's records (never edited by hand): the terminal gets a rich
table, the run directory gets `report.md` and `bench.json` (the typed summary later
reports and bundles read).
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, Field

from ..tracks.records import compress_records, eval_records, judge_records, track4_memory_note
from ..tracks.scoring import MetricRecord, OMRow, ScoringError, drop_undefined_ratios, score
from .bench import BenchPlan
from .contract import SCHEMA_VERSION, Job, Result
from .fsio import write_atomic
from .judging import NO_JUDGE_NOTE, load_judged
from .store import Store

TRACK1_LABELS = {
    "mmlu": "MMLU", "arc_c": "ARC-c", "arc_e": "ARC-e", "hellaswag": "HellaSwag", "piqa": "PIQA",
    "winogrande": "WinoGrande", "qnli": "QNLI", "mnli": "MNLI-mm", "wikitext2_ppl": "WikiText-2 ppl",
}
TRACK4_LABELS = {"gpu_memory_gb": "inference memory (GB)", "model_size_gb": "size on disk (GB)", "tmacs": "effective TMACs (1x128)"}
TRACK6_LABELS = {"advglue_sst2": "AdvGLUE SST-2", "advglue_qqp": "AdvGLUE QQP", "advglue_mnli": "AdvGLUE MNLI",
                 "advglue_mnli_mm": "AdvGLUE MNLI-mm", "advglue_qnli": "AdvGLUE QNLI", "advglue_rte": "AdvGLUE RTE",
                 "truthfulqa_mc1": "TruthfulQA MC1", "truthfulqa_mc2": "TruthfulQA MC2"}
TRACK7_LABELS = {"kick_factoid_em": "factoid QA EM (FreebaseQA)", "kick_mcqa_acc": "MCQA acc (MMLU 5-shot)",
                 "kick_icr_em": "retrieval EM (TriviaQA)", "kick_icr_f1": "retrieval F1 (TriviaQA)",
                 "kick_summarization": "summarization (judge)", "kick_instruction": "instruction following (judge)"}
TRACK5_LABELS = {"torch_native": "torch_native tokens/s (batch 1)", "vllm": "vLLM tokens/s (batch 1)",
                 "tensorrt_llm": "TensorRT-LLM tokens/s (batch 1)", "mlc_llm": "MLC-LLM tokens/s (batch 1)"}
LABELS = {**TRACK1_LABELS, **TRACK4_LABELS, **TRACK5_LABELS, **TRACK6_LABELS, **TRACK7_LABELS}


class Row(BaseModel):
    track: int
    metric: str
    label: str
    dense: float | None
    compressed: float | None
    ratio: float | None = Field(description="oriented so that >1 is better for the compressed model")


class BenchReport(BaseModel):
    schema_version: str = SCHEMA_VERSION
    method: str
    preset: str
    engine: str
    model: str
    model_identity: str
    profile: str
    device: str
    data_source: str
    calibration: str
    jobs: dict[str, dict] = Field(description="key -> {hash, run_dir, cached, wall_s}")
    rows: list[Row]
    track3: dict[str, float | str | None]
    track3_compared: list[dict]
    oms: list[OMRow]
    notes: list[str] = Field(default_factory=list, description="cells left out of an OM, and why; how a figure was measured "
                                                                 "where the table alone would mislead")


def plan_eval_records(plan: BenchPlan) -> tuple[list[MetricRecord], list[MetricRecord]]:
    """(dense, compressed) scoring records of a bench's evaluation jobs, one pair per track
    group (bench.EVAL_GROUPS)."""
    dense: list[MetricRecord] = []
    compressed: list[MetricRecord] = []
    for key, run in plan.runs.items():
        if key.startswith(("dense eval", "dense deploy")):
            dense += eval_records(run.result.metrics, plan.model.name, "dense", "dense")
        elif key.startswith(("compressed eval", "compressed deploy")):
            compressed += eval_records(run.result.metrics, plan.model.name, plan.method.name, plan.setting)
            if key == "compressed eval t7":  # the judged task, when a judge was configured
                d, c = judge_records(load_judged(run.run_dir), plan.model.name, plan.method.name, plan.setting)
                dense, compressed = dense + d, compressed + c
    return dense, compressed


def build_report(plan: BenchPlan) -> BenchReport:
    runs = plan.runs
    model, method, setting = plan.model.name, plan.method.name, plan.setting
    records: list[MetricRecord] = []
    rows: list[Row] = []
    dense_records, comp_records = plan_eval_records(plan)
    if comp_records:
        dense = {(r.track, r.metric): r.value for r in dense_records}
        records += dense_records + comp_records
        for r in comp_records:
            d = dense.get((r.track, r.metric))
            label = LABELS.get(r.metric, r.metric)
            ratio = None
            if d:
                ratio = r.value / d if r.info.higher_is_better else (d / r.value if r.value else math.inf)
            rows.append(Row(track=r.track, metric=r.metric, label=label, dense=d, compressed=r.value, ratio=ratio))

    comp = runs["compress"]
    t3 = comp.result.metrics["track3"]
    compared = _track3_peers(plan)
    own_label = _peer_label(comp.job)  # what track 3 calls this run (its engine named when not the reference)
    if 3 in plan.tracks:
        records += [r for peer in compared for r in peer["records"]]
    records, notes = drop_undefined_ratios(records)
    for key, run in runs.items():
        memory_note = key.startswith("compressed eval") and track4_memory_note(run.result.metrics)
        if memory_note:
            notes.append(memory_note)
    if 7 in plan.tracks and not any(r.metric == "kick_instruction" for r in comp_records):
        notes.append(NO_JUDGE_NOTE)
    try:
        oms = score(records)
    except ScoringError as e:
        oms, notes = [], notes + [f"not scored: {e}"]
    cal = comp.job.calibration
    return BenchReport(
        method=method, preset=setting, engine=plan.engine, model=model, model_identity=plan.model.identity,
        profile=plan.profile.name, device=plan.device, data_source=plan.data_source,
        calibration=f"{cal.dataset} {cal.nsamples}x{cal.seqlen} seed {cal.seed} ({cal.source})",
        jobs={k: {"hash": r.job_hash, "run_dir": str(r.run_dir), "cached": r.cached, "wall_s": r.result.wall_s} for k, r in runs.items()},
        rows=rows,
        track3={"compress_s": t3["compress_s"], "peak_rss_gb": t3["compress_peak_rss_bytes"] / 1e9,
                "peak_gpu_gb": (t3.get("compress_peak_gpu_bytes") or 0) / 1e9 or None, "device": t3["device"]},
        track3_compared=[{k: v for k, v in p.items() if k != "records"} for p in compared],
        oms=[o for o in oms if o.method == method and o.setting == (own_label if o.track == 3 else setting)],
        notes=notes,
    )


def _track3_peers(plan: BenchPlan) -> list[dict]:
    """Track 3 compares methods on the same model, profile and device: every ok compress
    result in the store that matches (the latest per method/preset/engine). The bench's own
    compress run is its own peer whatever else the store holds: OM_train is this run's."""
    own = plan.runs["compress"]
    this = own.job
    own_key, own_dir = _peer_key(this), Path(own.run_dir).resolve()
    peers: dict[tuple[str, str, str], dict] = {}
    for job, result, run_dir in Store(plan.runs_dir).results():
        if job.kind != "compress" or result.status != "ok" or job.model.identity != this.model.identity:
            continue
        if job.profile != this.profile or job.device != this.device:
            continue
        key = _peer_key(job)
        if key == own_key:  # another run of this very setting (older code, say): never this bench's figures
            if Path(run_dir).resolve() != own_dir:
                continue
        elif key in peers and peers[key]["finished_at"] >= result.finished_at:
            continue
        peers[key] = _peer(job, result, this)
    return list(peers.values())


def _peer_key(job: Job) -> tuple[str, str, str]:
    """The engine is part of a peer: the reference and upstream runs of one preset are two
    implementations with their own time and memory, never one replacing the other."""
    return job.method, job.setting(), job.engine


def _peer_label(job: Job) -> str:
    """The preset as reports name it, with a non-reference engine in brackets (as the store
    report's settings do), so that two engines' rows read apart and score as two cells."""
    return job.setting() + (f" [{job.engine}]" if job.engine != "reference" else "")


def _peer(job: Job, result: Result, this: Job) -> dict:
    """One row of the track-3 comparison, with its scoring records (on this bench's model)."""
    label = _peer_label(job)
    return {"method": job.method, "preset": label, "compress_s": result.metrics["track3"]["compress_s"],
            "finished_at": result.finished_at, "records": compress_records(result.metrics, this.model.name, job.method, label)}


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"


def render_markdown(rep: BenchReport) -> str:
    lines = [
        f"# llmcbench: {rep.method} {rep.preset} on {rep.model}",
        "",
        f"- profile: **{rep.profile}** (quick = smoke-test settings, not comparable with the paper)" if rep.profile == "quick" else f"- profile: **{rep.profile}**",
        f"- engine: {rep.engine}; device: {rep.device}; data: {rep.data_source}; calibration: {rep.calibration}",
        f"- model: {rep.model_identity}",
        "",
        "## Overall metrics",
        "",
        "| track | OM | value | cells |",
        "|---|---|---|---|",
        *[f"| {o.track} | {o.om} | {_fmt(o.value)} | {o.n_cells} |" for o in rep.oms],
        "",
        *[f"- {n}" for n in rep.notes],
        *([""] if rep.notes else []),
    ]
    for track, title in ((1, "Track 1: compression performance"), (2, "Track 2: generalization (WikiText-2 ppl)"),
                         (4, "Track 4: inference consumption"), (5, "Track 5: hardware acceleration (decode tokens/s)"),
                         (6, "Track 6: trustworthiness"), (7, "Track 7: LLM-KICK")):
        rows = [r for r in rep.rows if r.track == track]
        if rows:
            lines += [f"## {title}", "", "| metric | dense | compressed | ratio |", "|---|---|---|---|"]
            lines += [f"| {r.label} | {_fmt(r.dense, 4 if track == 4 else 2)} | {_fmt(r.compressed, 4 if track == 4 else 2)} | {_fmt(r.ratio, 3)} |" for r in rows]
            lines.append("")
    t3 = rep.track3
    lines += ["## Track 3: compression consumption", "",
              f"compression step alone: {t3['compress_s']:.1f} s on {t3['device']}, peak host RSS {t3['peak_rss_gb']:.2f} GB"
              + (f", peak GPU {t3['peak_gpu_gb']:.2f} GB" if t3.get("peak_gpu_gb") else ""), ""]
    if len(rep.track3_compared) > 1:
        lines += ["| method | preset | compress s |", "|---|---|---|"]
        lines += [f"| {p['method']} | {p['preset']} | {p['compress_s']:.1f} |" for p in rep.track3_compared]
        lines.append("")
    lines += ["## Jobs", "", "| job | hash | cached | wall s | run dir |", "|---|---|---|---|---|"]
    lines += [f"| {k} | `{j['hash'][:16]}` | {'yes' if j['cached'] else 'no'} | {j['wall_s']:.1f} | `{j['run_dir']}` |" for k, j in rep.jobs.items()]
    return "\n".join(lines) + "\n"


def render_rich(rep: BenchReport, console) -> None:
    from rich.table import Table

    t = Table(title=f"{rep.method} {rep.preset} on {rep.model} — profile {rep.profile}, {rep.device}", show_lines=False)
    for col, just in (("track", "right"), ("metric", "left"), ("dense", "right"), ("compressed", "right"), ("ratio", "right")):
        t.add_column(col, justify=just)
    for r in rep.rows:
        digits = 4 if r.track == 4 else 2
        t.add_row(str(r.track), r.label, _fmt(r.dense, digits), _fmt(r.compressed, digits), _fmt(r.ratio, 3))
    t3 = rep.track3
    t.add_row("3", "compression time (s)", "", _fmt(t3["compress_s"], 1), "")
    t.add_row("3", "compression peak " + ("GPU (GB)" if t3.get("peak_gpu_gb") else "RSS (GB)"), "",
              _fmt(t3.get("peak_gpu_gb") or t3["peak_rss_gb"]), "")
    console.print(t)
    om = Table(title="Overall metrics (SPEC.md section 5)")
    for col in ("track", "OM", "value", "cells"):
        om.add_column(col, justify="right" if col != "OM" else "left")
    for o in rep.oms:
        om.add_row(str(o.track), o.om, f"[bold]{_fmt(o.value)}[/bold]", str(o.n_cells))
    console.print(om)
    for n in rep.notes:
        console.print(f"[dim]note: {n}[/dim]")


def write_report(rep: BenchReport, run_dir: Path) -> Path:
    write_atomic(run_dir / "bench.json", rep.model_dump_json(indent=2) + "\n")
    path = run_dir / "report.md"
    write_atomic(path, render_markdown(rep))
    return path
