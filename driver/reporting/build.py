"""From a result store to the typed `StoreReport`: which runs are trusted, which runs form a
cell, what each cell is scored against.

Rules (all from the store's own records, so a bundle re-derives the same report):
- A run dir is trusted when its `job.json` and sealed `result.json` validate, the result
  belongs to the dir (`job_hash`), the job file is the one the result hashed, every output
  the result recorded is there and matches its sha256 (`store.run_problem`; in a bundle, the
  weights it does not carry are listed in its artifacts.json instead), and a track-7
  `judge.json` beside it is sealed and judges this job. Others are listed as problems, never
  scored. Failed jobs are listed with their error.
- A cell is one (model identity, profile, method, preset, engine, params); when the store
  holds several compress runs of a cell (code changed between runs), the latest counts.
- Its compressed evaluations are the evals of the artifact (`artifact:<compress hash>`), per
  track the latest that covers it (track groups 1/2/4, 6, 7: `bench.EVAL_GROUPS`; a store may
  also hold an older 1/4 beside a newer 1/2/4, whose tracks 1 and 4 then come from the newer
  only); each one's dense baseline is the latest dense eval of the same model with the same evaluation
  settings, device and dtype that finished before the compressed one started (what `bench`
  used), else the latest such.
- A group (one model identity under one profile) is what gets compared: track 3's baseline
  is the largest time and memory among its cells (SPEC 5), and the fairness check flags what
  differs between them. Profiles are never mixed: quick figures compare only with quick ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ...tracks.records import compress_records, eval_records, judge_records, track4_memory_note
from ..judging import load_judged
from ...tracks.scoring import MetricRecord, ScoringError, drop_undefined_ratios, score
from ..contract import ContractError, Job, Result, artifact_digest, canonical_json, read_record
from ..store import REHASH_BYTES, run_problem
from ..report import LABELS
from .paper import compare_group, load_matching
from .schema import (
    FAIRNESS_FIELDS, CellReport, Fairness, GroupReport, MetricCell, OMCell, RunProblem, RunRef, StoreReport, Track3Cell,
)

GB = 1e9


@dataclass
class StoredRun:
    job: Job
    result: Result
    path: str  # run dir relative to the store root
    judged: dict | None = None  # track 7's judge.json beside the result, when a judge was configured

    @property
    def ref(self) -> RunRef:
        return RunRef(kind=self.job.kind, job_hash=self.result.job_hash, path=self.path, finished_at=self.result.finished_at)

    @property
    def source(self) -> str:
        return f"{self.path}/result.json"


def generator() -> str:
    try:
        return f"llmcbench {metadata.version('llmcbench')}"
    except metadata.PackageNotFoundError:
        return "llmcbench"


def scan_store(root: Path, rehash_all: bool = False) -> tuple[list[StoredRun], list[RunProblem]]:
    """Every run dir (`<cell>/<hash>/` holding a job.json or result.json), trusted or not.
    `rehash_all`: re-hash even the large outputs (the weights), not only check they are there."""
    runs, _failed, problems = scan_runs(root, rehash_all)
    return runs, problems


def scan_runs(root: Path, rehash_all: bool = False) -> tuple[list[StoredRun], list[StoredRun], list[RunProblem]]:
    """scan_store, plus the trusted runs that failed (each also a problem): part of the record
    (sealed result + log), bundled, never scored."""
    runs, failed, problems = [], [], []
    root = Path(root)
    listed = _bundle_listed(root)
    dirs = sorted({p.parent for pattern in ("*/*/job.json", "*/*/result.json") for p in root.glob(pattern)})
    for d in dirs:
        rel = d.relative_to(root).as_posix()
        try:
            job = read_record(d / "job.json", Job)
        except ContractError as e:
            problems.append(RunProblem(path=f"{rel}/job.json", status="untrusted", message=_strip(str(e), d)))
            continue
        if not (d / "result.json").is_file():
            problems.append(RunProblem(path=rel, status="incomplete", message="no result.json (still running, or interrupted)"))
            continue
        try:
            result = read_record(d / "result.json", Result)
        except ContractError as e:
            problems.append(RunProblem(path=f"{rel}/result.json", status="untrusted", message=_strip(str(e), d)))
            continue
        message = _consistency(d, job, result, rehash_all, _listed_for(listed, rel))
        if message:
            problems.append(RunProblem(path=rel, status="untrusted", message=message))
        elif result.status != "ok":
            err = result.error
            problems.append(RunProblem(path=f"{rel}/result.json", status="failed",
                                       message=f"{err.type}: {err.message}" if err else "failed"))
            failed.append(StoredRun(job, result, rel))
        else:
            runs.append(StoredRun(job, result, rel, load_judged(d)))
    return runs, failed, problems


def _strip(message: str, run_dir: Path) -> str:
    return message.replace(f"{run_dir}/", "")


def _consistency(run_dir: Path, job: Job, result: Result, rehash_all: bool = False, listed: dict[str, str] | None = None) -> str | None:
    """The store's one trust check (`store.run_problem`, also what a bench's track-3 peers pass):
    the result is this dir's, its job file and outputs are the ones it hashed, a judge.json is
    sealed and of this job. A recorded output that is gone (the weights) makes the run
    untrusted, or a bundle would carry results whose artifact no longer exists."""
    return run_problem(run_dir, result, None if rehash_all else REHASH_BYTES, listed)


def _bundle_listed(root: Path) -> dict[str, str]:
    """In a bundle (`<bundle>/runs` beside `artifacts.json`), the outputs it does not carry,
    by `runs/<run dir>/<output>`, with their sha256: these may be absent (`bundle.verify`
    checks the listing against each result). Empty for a store."""
    try:
        listed = json.loads((Path(root).parent / "artifacts.json").read_text())
    except (OSError, ValueError):
        return {}
    return listed if isinstance(listed, dict) and Path(root).name == "runs" else {}


def _listed_for(listed: dict[str, str], rel: str) -> dict[str, str]:
    prefix = f"runs/{rel}/"
    return {k.removeprefix(prefix): v for k, v in listed.items() if k.startswith(prefix)}


def build_store_report(root: Path) -> StoreReport:
    runs, failed, problems = scan_runs(root)
    matching = load_matching()
    compress = [r for r in runs if r.job.kind == "compress"]
    evals = [r for r in runs if r.job.kind in ("eval", "deploy")]  # deploy jobs measure track 5

    latest: dict[tuple, StoredRun] = {}
    for r in compress:
        key = _cell_key(r)
        if key not in latest or _newer(r, latest[key]):
            latest[key] = r
    by_group: dict[tuple[str, str], list[StoredRun]] = {}
    for key in sorted(latest):
        by_group.setdefault((key[0], key[1]), []).append(latest[key])

    groups = []
    for (identity, profile), members in sorted(by_group.items()):
        model = members[0].job.model.name
        groups.append(_group(model, identity, profile, members, evals, matching.paper_model(identity), failed))
    paper_rows = [row for g in groups for row in compare_group(g, matching)]
    notes = _paper_notes(groups, paper_rows)
    profiles = sorted({g.profile for g in groups} | {r.job.profile for r in runs})
    return StoreReport(generator=generator(), profiles=profiles, n_runs=len(runs), groups=groups, paper=paper_rows,
                       paper_notes=notes, runs=[r.ref for r in sorted(runs, key=lambda r: r.path)], problems=problems)


def _cell_key(r: StoredRun) -> tuple:
    return (r.job.model.identity, r.job.profile, r.job.method, r.job.preset or "", r.job.engine, canonical_json(r.job.params))


def _failed_since(comp: StoredRun, used: list[StoredRun], failed: list[StoredRun]) -> list[str]:
    """Notes for the failed runs a cell's figures do not answer: a later compress run of the same
    cell (the code changed, and the new code fails), and an evaluation of its artifact that no
    evaluation shown for the same tracks came after (a rerun that failed, or a track group that
    never succeeded). Without them nothing in the row would say that the latest attempt failed."""
    notes = []
    for f in sorted(failed, key=lambda r: (r.result.finished_at, r.path)):
        err = f"{f.path}, {f.result.finished_at}: {f.result.error.type if f.result.error else 'failed'}"
        if f.job.kind == "compress" and _cell_key(f) == _cell_key(comp) and _newer(f, comp):
            notes.append(f"a later compress run of this cell failed ({err}); the figures shown are from the earlier run")
        elif f.job.model.identity == f"artifact:{comp.result.job_hash}":
            units = set(_coverage(f))
            covering = [u for u in used if units & set(_coverage(u))]
            if all(_newer(f, u) for u in covering):
                tracks = ", ".join(str(t) for t in sorted({u[0] for u in units}))
                notes.append(f"{'a later' if covering else 'the'} {f.job.kind} of this artifact for track{'s' if len(units) > 1 else ''} "
                             f"{tracks} failed ({err})" + ("; the figures shown are from the earlier one" if covering else ""))
    return notes


def _newer(a: StoredRun, b: StoredRun) -> bool:
    return (a.result.finished_at, a.result.job_hash) > (b.result.finished_at, b.result.job_hash)


def _settings_labels(members: list[StoredRun]) -> list[str]:
    """`Job.setting` (the preset, plus `key=value` for the params set over it), and where two
    runs would still read the same (a store written before jobs recorded what was set), the
    params that tell them apart. Only a bare preset name is compared with the paper."""
    keys = [(r.job.method, r.job.setting(), r.job.engine) for r in members]
    labels = []
    for r, key in zip(members, keys):
        twins = [o for o, k in zip(members, keys) if k == key]
        differing = [k for k in r.job.params if any(o.job.params.get(k) != r.job.params[k] for o in twins)]
        label = r.job.setting(also=differing)
        if r.job.engine != "reference":
            label += f" [{r.job.engine}]"
        labels.append(label)
    return labels


def _group(model: str, identity: str, profile: str, members: list[StoredRun], evals: list[StoredRun], paper_model: str | None,
           failed: list[StoredRun] = ()) -> GroupReport:
    settings = _settings_labels(members)
    cells = []
    for comp, setting in zip(members, settings):
        # track 3 compares runs on one kind of device, as a bench does: a CPU run's time and host
        # memory beside a GPU run's set T_max and M_max for both (the store report and the bench
        # report gave one run two OM_trains)
        peers = [(r, s) for r, s in zip(members, settings) if _device_kind(r) == _device_kind(comp)]
        track3_records = [rec for r, s in peers for rec in compress_records(r.result.metrics, model, r.job.method, s)]
        track3_sources = [r.source for r, _ in peers]
        artifact_evals = [e for e in evals if e.job.model.identity == f"artifact:{comp.result.job_hash}"]
        # an evaluation of weights `compress --force` has replaced since scores another model
        stale = [e for e in artifact_evals if e.job.model.artifact_sha256 not in (None, artifact_digest(comp.result))]
        artifact_evals = [e for e in artifact_evals if e not in stale]
        pairs = [(ce, _dense_for(ce, comp, evals), tracks) for ce, tracks in _sources_per_track(artifact_evals)]
        cell = _cell(model, comp, setting, pairs, track3_records, track3_sources)
        cell.notes += _failed_since(comp, [e for e, _, _ in pairs], list(failed))
        if stale:
            cell.notes.append(f"{len(stale)} job(s) scored this cell's artifact before it was recomputed with other weights "
                              f"({', '.join(str(e.path) for e in stale)}): not shown; the same bench or eval runs them again")
        cells.append(cell)
    flags = [name for name in FAIRNESS_FIELDS
             if len({getattr(c.fairness, name) for c in cells}) > 1]
    return GroupReport(model=model, model_identity=identity, profile=profile, paper_model=paper_model, cells=cells,
                       fairness_flags=flags)


def _coverage(e: StoredRun) -> list[tuple]:
    """What one evaluation measures, in units no two sources may share: each of its tracks,
    or for a deploy job track 5 on its backend (each backend is a metric of its own)."""
    if e.job.evaluation is None:
        return [(5, e.job.deploy.backend)]
    return [(t,) for t in e.job.evaluation.tracks]


def _sources_per_track(artifact_evals: list[StoredRun]) -> list[tuple[StoredRun, tuple[int, ...]]]:
    """Each evaluation that is the latest to cover some track, with the tracks it is used for.

    Evaluations of one artifact overlap when the bench ran again with other tracks (the default
    tracks 1,4, later `TRACKS=all` as 1,2,4): both measure tracks 1 and 4, with inference memory
    measured twice, and two values of one dense metric make the cell unscorable. So per track
    only the latest evaluation covering it (and its dense twin) counts; an older one gives only
    the tracks no newer one covers, and none when a newer covers them all. Ordered by the first
    track each is used for, so the cell's main evaluation is the one of track 1 when it has one."""
    chosen: dict[tuple, StoredRun] = {}
    for e in artifact_evals:
        for unit in _coverage(e):
            if unit not in chosen or _newer(e, chosen[unit]):
                chosen[unit] = e
    used: dict[str, tuple[StoredRun, list[int]]] = {}
    for unit in sorted(chosen):
        e = chosen[unit]
        tracks = used.setdefault(e.path, (e, []))[1]
        if unit[0] not in tracks:
            tracks.append(unit[0])
    return [(e, tuple(tracks)) for e, tracks in used.values()]


def _device_kind(run: StoredRun) -> str:
    return run.job.device.split(":")[0]


def _latest(runs: list[StoredRun]) -> StoredRun | None:
    best = None
    for r in runs:
        if best is None or _newer(r, best):
            best = r
    return best


def _dense_for(comp_eval: StoredRun, comp: StoredRun, evals: list[StoredRun]) -> StoredRun | None:
    j = comp_eval.job
    candidates = [e for e in evals if e.job.method == "dense" and e.job.model.identity == comp.job.model.identity
                  and e.job.kind == j.kind and e.job.evaluation == j.evaluation and e.job.deploy == j.deploy and e.job.profile == j.profile and e.job.device == j.device
                  and e.job.dtype == j.dtype]
    before = [e for e in candidates if e.result.finished_at <= comp_eval.result.started_at]
    return _latest(before) or _latest(candidates)


def _cell(model: str, comp: StoredRun, setting: str, pairs: list[tuple[StoredRun, StoredRun | None, tuple[int, ...]]],
          track3_records: list[MetricRecord], track3_sources: list[str]) -> CellReport:
    """`pairs`: (compressed evaluation, its dense twin, the tracks it is the source of)."""
    method = comp.job.method
    metrics: list[MetricCell] = []
    records: list[MetricRecord] = list(track3_records)
    comp_eval, dense, _ = pairs[0] if pairs else (None, None, ())
    om_sources: dict[int, list[str]] = {}
    for comp_eval_i, dense_i, tracks in pairs:
        comp_recs = eval_records(comp_eval_i.result.metrics, model, method, setting)
        judged_dense: list[MetricRecord] = []
        if 7 in tracks and dense_i is not None:
            judged = comp_eval_i.judged
            if judged and judged.get("identity", {}).get("dense_job") == dense_i.result.job_hash:
                judged_dense, judged_comp = judge_records(judged, model, method, setting)
                comp_recs += judged_comp
        for t in tracks:  # track 5 has one source per backend
            sources = om_sources.setdefault(t, [])
            sources += [s for s in [comp_eval_i.source] + ([dense_i.source] if dense_i else []) if s not in sources]
        _metric_cells(comp_recs, comp_eval_i, dense_i, model, metrics, records, judged_dense, tracks)
    oms, notes = [], []
    if comp_eval is None:
        notes.append("no evaluation of this artifact in the store: tracks 1 and 4 not scored")
    elif any(d is None for _, d, _ in pairs):
        notes.append("no dense evaluation with the same settings in the store: ratios and OMs of its tracks not scored")
    notes += [n for n in (track4_memory_note(e.result.metrics) for e, _, _ in pairs) if n]
    records, left_out = drop_undefined_ratios(records)
    notes += left_out
    try:
        scored = score(records)
    except ScoringError as e:
        scored = []
        notes.append(f"not scored: {e}")
    for row in scored:
        if row.method != method or row.setting != setting:
            continue
        if row.track == 3:
            sources = [comp.source] + [s for s in track3_sources if s != comp.source]
        else:
            sources = om_sources[row.track]
        oms.append(OMCell(track=row.track, om=row.om, value=row.value, n_cells=row.n_cells, sources=sources))
    t3 = comp.result.metrics["track3"]
    gpu = t3.get("compress_peak_gpu_bytes")
    track3 = Track3Cell(compress_s=t3["compress_s"], peak_memory_gb=(gpu or t3["compress_peak_rss_bytes"]) / GB,
                        memory_kind="gpu" if gpu else "host_rss", device=t3["device"], source=comp.source)
    return CellReport(method=method, preset=comp.job.preset or "-", setting=setting, engine=comp.job.engine,
                      params=comp.job.params, compress=comp.ref, compressed_eval=comp_eval.ref if comp_eval else None,
                      dense_eval=dense.ref if dense else None, metrics=metrics, track3=track3, oms=oms,
                      fairness=_fairness(comp, comp_eval, dense), notes=notes)


def _metric_cells(comp_recs: list[MetricRecord], comp_eval: StoredRun, dense: StoredRun | None, model: str,
                  metrics: list[MetricCell], records: list[MetricRecord], extra_dense: list[MetricRecord],
                  tracks: tuple[int, ...]) -> None:
    """Adds one evaluation's metric cells (with their dense twins) and scoring records, of the
    `tracks` it is the source of only: an overlapping evaluation must not give a second value."""
    dense_recs = (eval_records(dense.result.metrics, model, "dense", "dense") if dense else []) + list(extra_dense)
    comp_recs = [r for r in comp_recs if r.track in tracks]
    dense_recs = [r for r in dense_recs if r.track in tracks]
    dense_values = {(r.track, r.metric): r.value for r in dense_recs}
    records += comp_recs + dense_recs
    for r in comp_recs:
        d = dense_values.get((r.track, r.metric))
        metrics.append(MetricCell(
            track=r.track, metric=r.metric, label=LABELS.get(r.metric, r.metric), unit=r.info.unit, dense=d,
            compressed=r.value, ratio=_ratio(r, d), dense_source=dense.source if d is not None else None,
            compressed_source=comp_eval.source))


def _ratio(r: MetricRecord, dense: float | None) -> float | None:
    if dense is None:
        return None
    num, den = (r.value, dense) if r.info.higher_is_better else (dense, r.value)
    return num / den if den > 0 else math.inf


def _fairness(comp: StoredRun, comp_eval: StoredRun | None, dense: StoredRun | None) -> Fairness:
    cal, job, res = comp.job.calibration, comp.job, comp.result
    env = res.environment
    evaluation = None
    if comp_eval is not None and comp_eval.job.evaluation is not None:
        e = comp_eval.job.evaluation
        evaluation = (f"tracks {','.join(map(str, e.tracks))}; limit {e.limit or 'full'}; ppl {e.ppl_seqlen}"
                      f" x {e.ppl_max_windows or 'all'}; mmlu {e.mmlu_shots}-shot; {e.data_source} data")
    return Fairness(
        calibration_dataset=f"{cal.dataset} ({cal.source})" if cal else None,
        calibration_sha256=res.input_sha256.get("calibration") or (cal.data_sha256 if cal else None),
        calibration_nsamples=cal.nsamples if cal else None, calibration_seqlen=cal.seqlen if cal else None,
        calibration_seed=cal.seed if cal else None, engine=job.engine, runner=res.provenance.runner,
        image=res.provenance.image, image_digest=res.provenance.image_digest, profile=job.profile, device=job.device,
        dtype=job.dtype, evaluation=evaluation, dense_baseline=dense.result.job_hash if dense else None,
        environment=f"torch {env.torch}, transformers {env.transformers}, lm-eval {env.lm_eval}"
                    + (f"; upstream code on torch {up.get('torch')}, transformers {up.get('transformers')}"
                       if (up := res.metrics.get("upstream", {}).get("environment")) else ""),
        source=comp.source)


def _paper_notes(groups: list[GroupReport], rows) -> list[str]:
    notes = []
    for g in groups:
        where = f"{g.model} (profile {g.profile})"
        if g.paper_model is None:
            notes.append(f"{where} matches no model of the paper's tables (model identity {g.model_identity[:24]}…): "
                         "only the hub ids listed in driver/reporting/paper_match.toml do, so none of its cells is compared.")
        elif not any(r.model == g.model and r.profile == g.profile for r in rows):
            notes.append(f"{where} is the paper's {g.paper_model}, but none of its methods/presets is a row of the paper's tables.")
    return notes

