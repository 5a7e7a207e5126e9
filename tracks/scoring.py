"""Overall metrics (OM) of the seven LLMCBench tracks, as pure functions over result records.

SPEC.md section 5 defines one OM per track (two plus their combination for track 1).
Every one of them has the same shape:

    OM = scale * sqrt(mean over the OM's terms of E[r^2])

where a *term* is a group of cells (knowledge datasets, inference datasets, one deploy
library, ...), `E` is the mean over that term's cells (model x dataset, model x library),
and `r` is a cell's ratio to its baseline, oriented so that higher is better:
compressed/baseline for accuracy-like scores and speeds, baseline/compressed for
perplexity, memory, size, MACs, time. The baseline is the dense model of the same
track, model and metric, except for track 3, whose baseline is the largest value among
all compared methods for the same model (SPEC 5: "T_max, M_max"); `scale` is 100
except for track 3 (SPEC 5: "not multiplied by 100"). OM_perf =
sqrt((OM_ka^2 + OM_ia^2)/2) is the same shape with both track-1 terms, since
OM_ka^2 = 100^2 * E_knowledge[r^2].

Because of that one shape, the tracks are data (`METRICS`, `OMS`) and `score` is one
loop. A method/setting gets an OM only where it has every cell its baseline defines for
that OM (same models, same datasets), so methods are never compared over different
cell sets. Bad numbers raise `ScoringError` naming the cell; nothing is averaged
silently (SPEC 9).

I/O is limited to the CSV helpers at the end: the long format read by
`llmcbench score FILE.csv` (documented in tracks/paper/long_format.md) and the paper's
wide tables shipped in tracks/paper/.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from llmcbench.driver.fsio import write_atomic


class ScoringError(ValueError):
    """Result records that cannot be scored: unknown metric, missing or conflicting
    baseline, NaN/inf, or a value that cannot be a ratio's denominator."""


# ---------------------------------------------------------------- metric catalogue


@dataclass(frozen=True)
class MetricInfo:
    """One measured quantity of one track. `group` is the OM term it feeds."""

    track: int
    name: str
    group: str
    higher_is_better: bool
    unit: str


def _metrics(track: int, group: str, unit: str, higher_is_better: bool, *names: str) -> list[MetricInfo]:
    return [MetricInfo(track, name, group, higher_is_better, unit) for name in names]


# Keyed by (track, metric): the same quantity can feed two tracks (WikiText-2 perplexity
# is in track 1's inference term and is the whole of track 2).
METRICS: dict[tuple[int, str], MetricInfo] = {
    (m.track, m.name): m
    for m in [
        *_metrics(1, "knowledge", "%", True, "mmlu", "arc_c", "arc_e"),
        *_metrics(1, "inference", "%", True, "hellaswag", "piqa", "winogrande", "qnli", "mnli"),
        *_metrics(1, "inference", "ppl", False, "wikitext2_ppl"),
        *_metrics(2, "generalization", "ppl", False, "wikitext2_ppl"),
        *_metrics(3, "time", "min", False, "compress_time_min"),
        *_metrics(3, "memory", "GB", False, "compress_memory_gb"),
        *_metrics(4, "gpu_memory", "GB", False, "gpu_memory_gb"),
        *_metrics(4, "model_size", "GB", False, "model_size_gb"),
        *_metrics(4, "macs", "TMACs", False, "tmacs"),
        # Track 5: one term per deploy library (SPEC 5: "mean over libraries").
        *[m for lib in ("tensorrt_llm", "vllm", "mlc_llm", "torch_native") for m in _metrics(5, lib, "tokens/s", True, lib)],
        *_metrics(6, "robustness", "%", True, "advglue_sst2", "advglue_qqp", "advglue_mnli", "advglue_mnli_mm", "advglue_qnli", "advglue_rte"),
        *_metrics(6, "truthfulness", "%", True, "truthfulqa_mc1", "truthfulqa_mc2"),
        # Track 7: one term per task (SPEC 5: "over tasks"); in-context retrieval is scored by EM
        # and F1, two cells of one term, so that it weighs as much as each other task, not twice
        *_metrics(7, "factoid", "%", True, "kick_factoid_em"),
        *_metrics(7, "mcqa", "%", True, "kick_mcqa_acc"),
        *_metrics(7, "retrieval", "%", True, "kick_icr_em", "kick_icr_f1"),
        # judged pairwise against the dense model's answers: the compressed score in % of dense's (dense = 100)
        *_metrics(7, "summarization", "judge score, % of dense", True, "kick_summarization"),
        *_metrics(7, "instruction", "judge score, % of dense", True, "kick_instruction"),
    ]
}


@dataclass(frozen=True)
class OMSpec:
    """One overall metric: `scale * sqrt(mean over terms of E_term[r^2])`.

    `terms=None` means every term of the track for which the baseline has cells: track 5
    averages over the libraries that were deployed, whichever they are.
    """

    name: str
    track: int
    terms: tuple[str, ...] | None
    scale: float = 100.0
    baseline: Literal["dense", "max"] = "dense"


OMS: tuple[OMSpec, ...] = (
    OMSpec("om_ka", 1, ("knowledge",)),
    OMSpec("om_ia", 1, ("inference",)),
    OMSpec("om_perf", 1, ("knowledge", "inference")),
    OMSpec("om_gen", 2, ("generalization",)),
    OMSpec("om_train", 3, ("time", "memory"), scale=1.0, baseline="max"),
    OMSpec("om_inf", 4, ("gpu_memory", "model_size", "macs")),
    OMSpec("om_hard", 5, None),
    OMSpec("om_trust", 6, ("robustness", "truthfulness")),
    OMSpec("om_kick", 7, None),  # the tasks the dense baseline has (the judged two need a judge)
)


# ---------------------------------------------------------------- records


class MetricRecord(BaseModel):
    """One measured cell: a metric of one model compressed by one method/setting.

    `method == "dense"` (any case) marks the uncompressed baseline of its (track, model,
    metric); its `setting` is ignored. `value` is in the catalogue's unit for the
    metric. NaN/inf are accepted here (a failed measurement is still a record) and
    refused by `score`.
    """

    model_config = ConfigDict(extra="forbid")

    track: int
    model: str
    method: str
    setting: str
    metric: str
    value: float

    @model_validator(mode="after")
    def _known_metric(self) -> MetricRecord:
        if (self.track, self.metric) not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r} for track {self.track}; known: {', '.join(_known(self.track))}")
        if not self.model or not self.method:
            raise ValueError("model and method must not be empty")
        return self

    @property
    def is_dense(self) -> bool:
        return self.method.lower() == "dense"

    @property
    def info(self) -> MetricInfo:
        return METRICS[self.track, self.metric]

    def cell(self) -> str:
        """The cell named for error messages."""
        return f"track {self.track}, model {self.model}, method {self.method}, setting {self.setting}, metric {self.metric}"


class OMRow(BaseModel):
    """One overall metric of one method/setting; `n_cells` is how many cells it averages."""

    model_config = ConfigDict(extra="forbid")

    method: str
    setting: str
    track: int
    om: str
    value: float
    n_cells: int


def _known(track: int) -> list[str]:
    return [name for (t, name) in METRICS if t == track] or [f"(no track {track}; tracks are 1-7)"]


# ---------------------------------------------------------------- scoring

Cell = tuple[int, str, str]  # (track, model, metric)


def score(records: Iterable[MetricRecord]) -> list[OMRow]:
    """Every OM of SPEC 5 that the records support, per (method, setting), in input order.

    Dense rows are the baseline and get no OM row (they are 100 by definition, except
    track 3 which has no dense baseline: its dense rows are ignored).
    """
    records = list(records)
    for r in records:
        if not math.isfinite(r.value) or r.value < 0:
            raise ScoringError(f"{r.cell()}: value {r.value} is not a finite non-negative number; fix or drop the cell")
    dense = _baselines(r for r in records if r.is_dense)
    methods: dict[tuple[str, str], dict[Cell, float]] = {}
    for r in records:
        if r.is_dense:
            continue
        cells = methods.setdefault((r.method, r.setting), {})
        _put(cells, (r.track, r.model, r.metric), r.value, f"conflicting values for {r.cell()}")
        if r.track != 3 and (r.track, r.model, r.metric) not in dense:
            raise ScoringError(f"no dense baseline for model {r.model}, metric {r.metric} (track {r.track}, needed by {r.method} {r.setting}): add a dense row for it")
    largest: dict[Cell, float] = {}  # track 3: T_max, M_max over all compared methods
    for cells in methods.values():
        for cell, value in cells.items():
            if cell[0] == 3:
                largest[cell] = max(value, largest.get(cell, value))

    rows = []
    for (method, setting), cells in methods.items():
        for om in OMS:
            baseline = largest if om.baseline == "max" else dense
            value_n = _om(om, cells, baseline, f"{method} {setting}")
            if value_n is not None:
                rows.append(OMRow(method=method, setting=setting, track=om.track, om=om.name, value=value_n[0], n_cells=value_n[1]))
    return rows


def drop_undefined_ratios(records: Iterable[MetricRecord]) -> tuple[list[MetricRecord], list[str]]:
    """Leave out, explicitly, the cells whose ratio cannot exist: a higher-is-better metric on
    which the dense model scores 0 (a 135M model answers no FreebaseQA question). `score`
    refuses such a cell; callers that score whatever a run measured use this first and show
    the returned notes, so the OM says which cells it averages."""
    records = list(records)
    zero = {(r.track, r.model, r.metric) for r in records
            if r.is_dense and r.value == 0 and METRICS.get((r.track, r.metric)) and METRICS[r.track, r.metric].higher_is_better}
    kept = [r for r in records if (r.track, r.model, r.metric) not in zero]
    notes = [f"{metric} on {model} (track {track}) left out of the OM: the dense model scores 0, so no ratio exists"
             for track, model, metric in sorted(zero)]
    return kept, notes


def _baselines(dense_records: Iterable[MetricRecord]) -> dict[Cell, float]:
    out: dict[Cell, float] = {}
    for r in dense_records:
        _put(out, (r.track, r.model, r.metric), r.value, f"conflicting dense baselines for model {r.model}, metric {r.metric} (track {r.track}; dense settings are ignored, keep one value)")
    return out


def _put(cells: dict[Cell, float], cell: Cell, value: float, conflict: str) -> None:
    if cell in cells and cells[cell] != value:
        raise ScoringError(f"{conflict}: {cells[cell]} vs {value}")
    cells[cell] = value


def _om(om: OMSpec, cells: dict[Cell, float], baseline: dict[Cell, float], who: str) -> tuple[float, int] | None:
    """(OM value, number of cells), or None when `cells` lacks a cell the baseline has."""
    terms: dict[str, list[Cell]] = {}
    for cell in sorted(baseline):
        group = METRICS[cell[0], cell[2]].group
        if cell[0] == om.track and (om.terms is None or group in om.terms):
            terms.setdefault(group, []).append(cell)
    wanted = om.terms or tuple(terms)
    if not wanted or any(t not in terms for t in wanted) or any(c not in cells for t in wanted for c in terms[t]):
        return None
    mean_squares = [sum(_ratio(cells[c], baseline[c], c, who) ** 2 for c in terms[t]) / len(terms[t]) for t in wanted]
    return om.scale * math.sqrt(sum(mean_squares) / len(mean_squares)), sum(len(terms[t]) for t in wanted)


def _ratio(value: float, base: float, cell: Cell, who: str) -> float:
    """The cell's ratio to its baseline, oriented so that higher is better (SPEC 5)."""
    track, model, metric = cell
    higher_is_better = METRICS[track, metric].higher_is_better
    num, den = (value, base) if higher_is_better else (base, value)
    if den <= 0:
        side = "baseline" if higher_is_better else "compressed"
        raise ScoringError(f"track {track}, model {model}, method {who}, metric {metric}: {side} value {den} is a ratio's denominator and must be > 0")
    return num / den


# ---------------------------------------------------------------- CSV helpers

LONG_COLUMNS = ("track", "model", "method", "setting", "metric", "value")

PAPER_DIR = Path(__file__).resolve().parent / "paper"
PAPER_TABLES: dict[int, Path] = {
    1: PAPER_DIR / "table1_track1_performance.csv",
    4: PAPER_DIR / "table3_track4_inference.csv",
    5: PAPER_DIR / "table5_track5_acceleration.csv",
}


def read_long_csv(path: str | Path) -> list[MetricRecord]:
    """Records from a long CSV (one cell per line; tracks/paper/long_format.md).

    Every bad line raises `ScoringError` naming the file and line number.
    """
    records = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != list(LONG_COLUMNS):
            raise ScoringError(f"{path}:1: header must be exactly {','.join(LONG_COLUMNS)}, got {','.join(header or [])!r}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not any(field.strip() for field in row):
                continue
            if len(row) != len(LONG_COLUMNS):
                raise ScoringError(f"{where}: expected {len(LONG_COLUMNS)} fields ({','.join(LONG_COLUMNS)}), got {len(row)}")
            track, model, method, setting, metric, value = row
            try:
                track_n = int(track)
            except ValueError:
                raise ScoringError(f"{where}: track {track!r} is not an integer 1-7") from None
            if (track_n, metric) not in METRICS:
                raise ScoringError(f"{where}: unknown metric {metric!r} for track {track_n}; known: {', '.join(_known(track_n))}")
            try:
                value_f = float(value)
            except ValueError:
                raise ScoringError(f"{where}: value {value!r} is not a number") from None
            try:
                records.append(MetricRecord(track=track_n, model=model, method=method, setting=setting, metric=metric, value=value_f))
            except ValidationError as e:
                raise ScoringError(f"{where}: {e.errors()[0]['msg']}") from None
    return records


def write_long_csv(records: Iterable[MetricRecord], path: str | Path) -> None:
    """Write records in the long format, atomically; `repr` keeps every float exact."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LONG_COLUMNS)
    for r in records:
        writer.writerow([r.track, r.model, r.method, r.setting, r.metric, repr(r.value)])
    write_atomic(Path(path), buf.getvalue())


def paper_wide_to_long(table_csv_path: str | Path, track: int | None = None) -> list[MetricRecord]:
    """Records from one of the paper's wide tables (tracks/paper/*.csv).

    Columns: `method` (or `category` in Table 5, used as the method name), `model`,
    `setting`, then one column per metric, then `om_*` columns, which are ignored here
    (see `paper_oms`). The track is the only one whose catalogue holds every metric
    column; pass `track` where that is ambiguous.
    """
    columns, rows = _wide_rows(table_csv_path)
    metrics = [c for c in columns[3:] if not c.startswith("om_")]
    if track is not None:
        if not 1 <= track <= 7:
            raise ScoringError(f"--track {track}: tracks are 1-7")
        if unknown := [m for m in metrics if (track, m) not in METRICS]:
            raise ScoringError(f"{table_csv_path}:1: {', '.join(map(repr, unknown))} is not a track {track} metric; "
                               f"known: {', '.join(_known(track))}")
    tracks = [track] if track else [t for t in range(1, 8) if all((t, m) in METRICS for m in metrics)]
    if len(tracks) != 1:
        raise ScoringError(f"{table_csv_path}:1: metric columns {metrics} do not name exactly one track (candidates {tracks}); "
                           "name the track (--track)")
    records = []
    for where, row in rows:
        for metric in metrics:
            value = _number(row[metric], f"{where}: {metric}")
            try:
                records.append(MetricRecord(track=tracks[0], model=row["model"], method=row[columns[0]],
                                            setting=row["setting"], metric=metric, value=value))
            except ValidationError as e:
                raise ScoringError(f"{where}: {e.errors()[0]['msg']}") from None
    return records


def _is_wide_header(columns: list[str]) -> bool:
    """`method` (or Table 5's `category`), `model`, `setting`, then at least one metric column."""
    return len(columns) >= 4 and columns[0] in ("method", "category") and columns[1:3] == ["model", "setting"]


def _wide_rows(path: str | Path) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """A wide table's header and its rows as (file:line, {column: field}). A repeated column
    (which one would be scored?) or a row of another width than the header is a ScoringError."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        columns = next(reader, None) or []
        if not _is_wide_header(columns):
            raise ScoringError(f"{path}:1: expected columns method|category,model,setting,<metrics>..., got {','.join(columns)}")
        if repeated := sorted({c for c in columns if columns.count(c) > 1}):
            raise ScoringError(f"{path}:1: column {repeated[0]!r} appears more than once: give each metric one column")
        rows = []
        for row in reader:
            if not row:
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != len(columns):
                raise ScoringError(f"{where}: {len(row)} fields, the header has {len(columns)}")
            rows.append((where, dict(zip(columns, row))))
    return columns, rows


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ScoringError(f"{what} value {text!r} is not a number") from None


def paper_oms(table_csv_path: str | Path) -> dict[tuple[str, str], dict[str, float]]:
    """The OMs the paper prints, per (method, setting): {"om_ka": 60.51, ...}.

    The paper prints them on the first row of each method/setting; later rows are blank.
    """
    printed: dict[tuple[str, str], dict[str, float]] = {}
    columns, rows = _wide_rows(table_csv_path)
    for where, row in rows:
        oms = {k: _number(v, f"{where}: {k}") for k, v in row.items() if k.startswith("om_") and v.strip()}
        if oms:
            printed.setdefault((row[columns[0]], row["setting"]), {}).update(oms)
    return printed


def read_results_csv(path: str | Path, track: int | None = None) -> tuple[list[MetricRecord], dict[tuple[str, str], dict[str, float]]]:
    """(records, printed OMs) from either format `llmcbench score` takes: the long format
    (long_format.md; nothing printed) or a wide table like the paper's (tracks/paper/*.csv),
    whose `om_*` columns are the OMs its authors printed, kept for the comparison.

    The header decides; anything else is one `ScoringError` naming both formats.
    """
    try:  # a byte that is not UTF-8, wherever the readers meet it, is this one error
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None) or []
        if header == list(LONG_COLUMNS):
            if track is not None:
                raise ScoringError(f"{path}: a long-format file names each cell's track; --track is for wide tables")
            return read_long_csv(path), {}
        if _is_wide_header(header):
            return paper_wide_to_long(path, track), paper_oms(path)
    except UnicodeDecodeError as e:
        raise ScoringError(f"{path}: not a UTF-8 text CSV (byte {e.start}: {e.reason})") from None
    raise ScoringError(f"{path}:1: header must be {','.join(LONG_COLUMNS)} (long format) or method,model,setting,<metric>,... "
                       f"(a wide table like the paper's), got {','.join(header)!r}")
