"""The report's tables as neutral rows (text + provenance), rendered by markdown and HTML alike.

Layouts follow the paper: Table 1 (methods x datasets with OM_ka, OM_ia, OM_perf), Table 3
(inference memory, size, MACs with OM_inf), the training-consumption table of track 3
(time, memory, OM_train), Table 5 (tokens/s per library with OM_hard). Every number cell
carries the store-relative `result.json` it was read from; paper figures carry the paper
table they come from.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

from ..report import TRACK1_LABELS, TRACK6_LABELS, TRACK7_LABELS
from .paper import load_matching
from .schema import FAIRNESS_FIELDS, CellReport, GroupReport, MetricCell, PaperRow, StoreReport

TRACK1_ORDER = ["mmlu", "arc_c", "arc_e", "hellaswag", "piqa", "winogrande", "qnli", "mnli", "wikitext2_ppl"]
TRACK4_ORDER = ["gpu_memory_gb", "model_size_gb", "tmacs"]
TRACK5_ORDER = ["tensorrt_llm", "vllm", "mlc_llm", "torch_native"]
OM_ORDER = ["om_ka", "om_ia", "om_perf", "om_gen", "om_train", "om_inf", "om_hard", "om_trust", "om_kick"]
OM_LABEL = {om: om.replace("om_", "OM_") for om in OM_ORDER}


@dataclass
class Cell:
    text: str
    source: str | None = None  # store-relative result.json / job.json
    paper: str | None = None  # paper table file name
    flag: bool = False
    title: str | None = None
    number: bool = False


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    note: str | None = None
    flagged_columns: set[int] = field(default_factory=set)


def fmt(value: float | None, unit: str, extra_digits: int = 0) -> str:
    if value is None:
        return "-"
    if unit in ("%", "ppl", "OM", "tokens/s") or unit.endswith("% of dense"):
        return f"{value:.{2 + extra_digits}f}"
    if unit == "s":
        return f"{value:.{1 + extra_digits}f}"
    if unit == "ratio":
        return f"{value:.{3 + extra_digits}f}"
    return f"{value:.{4 + extra_digits}g}"


def delta_text(row: PaperRow) -> str:
    """A paper row's delta, signed, with as many more digits as it takes to read on the side of
    the tolerance its verdict is on: +1.004 pt against a ±1 pt tolerance is "+1.004", not a
    "+1.00" next to "outside". A row without a verdict shows the unit's usual digits."""
    tolerance = load_matching().tolerance.get(row.unit) if row.verdict != "n/a" else None
    for extra in range(7):
        text = fmt(row.delta, row.unit, extra)
        if tolerance is None or tolerance.within(row.paper + float(text), row.paper) == (row.verdict == "ok"):
            break
    return ("+" if row.delta >= 0 else "") + text


def num(value: float | None, unit: str, source: str | None) -> Cell:
    return Cell(fmt(value, unit), source=source if value is not None else None, number=value is not None, title=source)


def _dense_rows(group: GroupReport, present: list[str], track: int | None) -> list[tuple[CellReport, list[str]]]:
    """One dense row per distinct set of dense runs the table's ratios were taken against: a
    representative cell and those runs' sources. Keyed by the metrics' own dense sources, not by
    the cell's main dense evaluation: a track-6, track-7 or track-5 baseline is another job, and
    two cells with one main dense can have had different ones (a rerun between their benches).
    A cell whose baselines are a subset of another's shows no second row."""
    keyed = []
    for c in group.cells:
        sources = {mc.dense_source for m in present if (mc := _metric(c, m, track)) and mc.dense_source}
        if sources:
            keyed.append((c, sources))
    rows: list[tuple[CellReport, set[str]]] = []
    for c, sources in sorted(keyed, key=lambda cs: -len(cs[1])):  # stable: the group's order among equals
        if not any(sources <= kept for _, kept in rows):
            rows.append((c, sources))
    order = {id(c): i for i, c in enumerate(group.cells)}
    return [(c, sorted(src)) for c, src in sorted(rows, key=lambda r: order[id(r[0])])]


def _run_id(source: str) -> str:
    """The short job hash of a source (`<cell>/<job hash>/result.json`)."""
    parts = source.split("/")
    return parts[-2][:8] if len(parts) >= 2 else source


def _metric(cell: CellReport, name: str, track: int | None = None) -> MetricCell | None:
    return next((m for m in cell.metrics if m.metric == name and track in (None, m.track)), None)


def _om(cell: CellReport, name: str):
    return next((o for o in cell.oms if o.om == name), None)


def _metrics_table(group: GroupReport, title: str, order: list[str], labels: dict[str, str], oms: list[str], note: str | None,
                   track: int | None = None) -> Table | None:
    present = [m for m in order if any(_metric(c, m, track) for c in group.cells)]
    if not present:
        return None
    columns = ["method", "setting"] + [labels[m] for m in present] + [OM_LABEL[o] for o in oms]
    rows = []
    denses = _dense_rows(group, present, track)
    for d, sources in denses:
        label = "dense" if len(denses) == 1 else f"dense ({', '.join(dict.fromkeys(_run_id(s) for s in sources))})"
        row = [Cell(label), Cell("-")]
        for m in present:
            mc = _metric(d, m, track)
            row.append(num(mc.dense if mc else None, mc.unit if mc else "", mc.dense_source if mc else None))
        # the dense model is its own baseline: 100 by definition (track 3 has no dense baseline)
        row += [Cell("100.00", source=sources[0], number=True, title="the baseline: 100 by definition")
                if o != "om_train" else Cell("-") for o in oms]
        rows.append(row)
    for c in group.cells:
        row = [Cell(c.method), Cell(c.setting)]
        for m in present:
            mc = _metric(c, m, track)
            row.append(num(mc.compressed if mc else None, mc.unit if mc else "", mc.compressed_source if mc else None))
        for o in oms:
            om = _om(c, o)
            row.append(Cell(fmt(om.value, "OM"), source=om.sources[0], number=True, title=", ".join(om.sources)) if om else Cell("-"))
        rows.append(row)
    return Table(title, columns, rows, note)


def track1_table(group: GroupReport) -> Table | None:
    return _metrics_table(group, "Track 1: compression performance (Table 1 layout)", TRACK1_ORDER, TRACK1_LABELS,
                          ["om_ka", "om_ia", "om_perf"], "accuracy in %, WikiText-2 perplexity (lower is better)", track=1)


def track2_table(group: GroupReport) -> Table | None:
    return _metrics_table(group, "Track 2: generalization (Table 2 layout, this model's row)", ["wikitext2_ppl"],
                          {"wikitext2_ppl": "WikiText-2 ppl"}, ["om_gen"],
                          "OM_gen over several models needs one store with each model: `llmcbench matrix --models ...`", track=2)


def track2_models_table(report: StoreReport, profile: str) -> Table | None:
    """Table 2's layout: WikiText-2 ppl of every method/setting (rows) on every model (columns)
    of one profile, and OM_gen over all of them (SPEC 5: the RMS over models of
    ppl_dense/ppl_c); a method that lacks a model gets no OM_gen rather than one over fewer
    models. Shown when the store holds track 2 on two or more models.

    Columns are model identities (two revisions of one model are two columns, named apart), and
    each row's OM_gen is computed from its own cells' dense baselines, those their ratios used:
    keyed by name and re-scored against the first cell's dense, a later revision overwrote an
    earlier one and a row's OM_gen could differ from its own group's."""
    groups = [g for g in report.groups if g.profile == profile]
    dense: dict[str, MetricCell] = {}
    names: dict[str, str] = {}
    values: dict[tuple[str, str], dict[str, MetricCell]] = {}
    for g in groups:
        for c in g.cells:
            mc = _metric(c, "wikitext2_ppl", 2)
            if mc is not None and mc.compressed is not None and mc.dense is not None:
                dense.setdefault(g.model_identity, mc)
                names[g.model_identity] = g.model
                values.setdefault((c.method, c.setting), {})[g.model_identity] = mc
    models = sorted(dense, key=lambda i: (names[i], i))
    if len(models) < 2:
        return None
    shared = {n for n in names.values() if list(names.values()).count(n) > 1}
    header = [names[i] + (f" @{i.rsplit('@', 1)[-1][:7]}" if names[i] in shared else "") for i in models]
    rows = [[Cell("dense"), Cell("-")] + [num(dense[m].dense, "ppl", dense[m].dense_source) for m in models]
            + [Cell("100.00", number=True, title="the baseline: 100 by definition")]]
    for (method, setting), per_model in values.items():
        ratios = [per_model[m].dense / per_model[m].compressed for m in models if m in per_model and per_model[m].compressed > 0]
        om = 100 * math.sqrt(sum(r * r for r in ratios) / len(ratios)) if len(ratios) == len(models) else None
        row = [Cell(method), Cell(setting)]
        row += [num(per_model[m].compressed, "ppl", per_model[m].compressed_source) if m in per_model else Cell("-")
                for m in models]
        row.append(Cell(fmt(om, "OM"), number=True, title=f"RMS over {len(models)} models, each against its own dense run")
                   if om is not None else Cell("-", title="not on every model: no OM_gen over fewer models"))
        rows.append(row)
    return Table(f"Track 2: generalization across models (Table 2 layout), profile {profile}",
                 ["method", "setting"] + header + ["OM_gen"], rows,
                 "WikiText-2 perplexity (lower is better); OM_gen = 100 x RMS over the models of ppl_dense / ppl_compressed")


def track6_table(group: GroupReport) -> Table | None:
    return _metrics_table(group, "Track 6: trustworthiness (AdvGLUE robustness, TruthfulQA)", list(TRACK6_LABELS), TRACK6_LABELS,
                          ["om_trust"], "accuracy in %, 0-shot; AdvGLUE label maps follow the GLUE label definitions", track=6)


def track7_table(group: GroupReport) -> Table | None:
    return _metrics_table(group, "Track 7: knowledge-intensive tasks (LLM-KICK)", list(TRACK7_LABELS), TRACK7_LABELS,
                          ["om_kick"], "exact match / F1 / accuracy in %; judge scores only where a judge was configured", track=7)


def track4_table(group: GroupReport) -> Table | None:
    labels = {"gpu_memory_gb": "inference memory (GB)", "model_size_gb": "size on disk (GB)", "tmacs": "effective TMACs (1x128)"}
    return _metrics_table(group, "Track 4: inference consumption (Table 3 layout)", TRACK4_ORDER, labels, ["om_inf"], None)


def track5_table(group: GroupReport) -> Table | None:
    labels = {"tensorrt_llm": "TensorRT-LLM", "vllm": "vLLM", "mlc_llm": "MLC-LLM", "torch_native": "torch native"}
    return _metrics_table(group, "Track 5: hardware acceleration (Table 5 layout), decode tokens/s", TRACK5_ORDER, labels, ["om_hard"], None)


def track3_table(group: GroupReport) -> Table:
    rows = []
    for c in group.cells:
        t = c.track3
        om = _om(c, "om_train")
        rows.append([Cell(c.method), Cell(c.setting), Cell(t.device), num(t.compress_s, "s", t.source),
                     num(t.peak_memory_gb, "GB", t.source), Cell("GPU" if t.memory_kind == "gpu" else "host RSS"),
                     Cell(fmt(om.value, "OM"), source=om.sources[0], number=True, title=", ".join(om.sources)) if om else Cell("-")])
    note = ("time and peak memory of the compression step alone; OM_train's baseline is the largest time and "
            "memory among the methods of this table (SPEC 5), not multiplied by 100")
    return Table("Track 3: compression (training) consumption", ["method", "setting", "device", "time (s)", "peak memory (GB)", "memory", "OM_train"], rows, note)


def om_table(group: GroupReport) -> Table:
    present = [o for o in OM_ORDER if any(_om(c, o) for c in group.cells)]
    rows = []
    for c in group.cells:
        row = [Cell(c.method), Cell(c.setting)]
        for o in present:
            om = _om(c, o)
            row.append(Cell(fmt(om.value, "OM"), source=om.sources[0], number=True, title=", ".join(om.sources)) if om else Cell("-"))
        rows.append(row)
    notes = "; ".join(f"{c.method} {c.setting}: {n}" for c in group.cells for n in c.notes) or None
    return Table("Overall metrics per track", ["method", "setting"] + [OM_LABEL[o] for o in present], rows, notes)


def fairness_table(group: GroupReport) -> Table:
    names = list(FAIRNESS_FIELDS)
    flagged = {i + 2 for i, n in enumerate(names) if n in group.fairness_flags}
    rows = []
    for c in group.cells:
        f = c.fairness
        row = [Cell(c.method), Cell(c.setting)]
        for i, n in enumerate(names):
            value = getattr(f, n)
            text = "-" if value is None else str(value)
            if n in ("calibration_sha256", "image_digest", "dense_baseline") and value:
                text = text.removeprefix("sha256:")[:12]
            source = c.dense_eval.result if n == "dense_baseline" and c.dense_eval else (
                c.compressed_eval.job if n == "evaluation" and c.compressed_eval else f.source)
            row.append(Cell(text, source=source if value is not None else None, flag=(i + 2) in flagged, title=str(value)))
        rows.append(row)
    if group.fairness_flags:
        note = "differs between the compared methods (flagged): " + ", ".join(FAIRNESS_FIELDS[n] for n in group.fairness_flags)
    else:
        note = "every compared method ran under the same conditions" if len(group.cells) > 1 else "one method: nothing to compare"
    return Table("Fairness check", ["method", "setting"] + [FAIRNESS_FIELDS[n] for n in names], rows, note, flagged)


def paper_table(report: StoreReport) -> Table | None:
    if not report.paper:
        return None
    rows = []
    for r in report.paper:
        rows.append([Cell(r.model), Cell(r.paper_model), Cell(f"{r.method} {r.setting}"), Cell(f"{r.paper_method} {r.paper_setting}"),
                     Cell(r.profile), Cell(r.label), num(r.measured, r.unit, r.source),
                     Cell(fmt(r.paper, r.unit), paper=r.paper_table, number=True, title=f"paper: {r.paper_table}"),
                     Cell(delta_text(r), source=r.source, number=True, title=r.source),
                     Cell(r.tolerance),
                     Cell(r.verdict, flag=r.verdict == "outside")])
    return Table("Measured vs the paper", ["model", "paper model", "method", "paper row", "profile", "quantity", "measured",
                                        "paper", "delta", "tolerance", "verdict"], rows,
                 "paper OMs are re-scored from the paper's rows of the same model (the printed ones average two models)")


def runs_table(report: StoreReport) -> Table:
    rows = [[Cell(r.path.split("/")[0]), Cell(r.kind), Cell(r.job_hash[:16], source=r.result, title=r.result), Cell(r.finished_at)]
            for r in report.runs]
    return Table("Runs in the store", ["cell", "kind", "job hash (result.json)", "finished"], rows)


def problems_table(report: StoreReport) -> Table | None:
    if not report.problems:
        return None
    rows = [[Cell(p.path), Cell(p.status, flag=True), Cell(p.message)] for p in report.problems]
    return Table("Runs not scored", ["run", "status", "reason"], rows, "failed jobs keep their log; untrusted runs are never scored")
