"""`report.json`: the typed store report every rendering (markdown, HTML) and `verify` read.

It is a pure function of the store (no timestamps, no host paths): built twice from the
same results it is the same JSON, which is what lets `verify` re-derive it from a bundle's
raw `result.json` files and demand identity. Every number carries the store-relative path
of the `result.json` it came from (`source`), so renderings link each number to its
provenance (STYLE.md "Typed records at every boundary", "A checker that trusts nothing").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..contract import SCHEMA_VERSION


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunRef(_Record):
    """One job of the store: `path` is its run dir relative to the store root (posix)."""

    kind: str
    job_hash: str
    path: str
    finished_at: str

    @property
    def result(self) -> str:
        return f"{self.path}/result.json"

    @property
    def job(self) -> str:
        return f"{self.path}/job.json"


class MetricCell(_Record):
    """One measured quantity of a cell: the dense baseline, the compressed value, their ratio
    oriented so that > 1 is better for the compressed model (SPEC 5)."""

    track: int
    metric: str
    label: str
    unit: str
    dense: float | None
    compressed: float | None
    ratio: float | None
    dense_source: str | None
    compressed_source: str | None


class OMCell(_Record):
    track: int
    om: str
    value: float
    n_cells: int
    sources: list[str] = Field(description="the result.json files it was scored from, the main one first")


class Track3Cell(_Record):
    """Time and peak memory of the compression step alone (SPEC 5 track 3)."""

    compress_s: float
    peak_memory_gb: float
    memory_kind: Literal["gpu", "host_rss"]
    device: str
    source: str


class Fairness(_Record):
    """What must be equal between compared methods for the comparison to be fair."""

    calibration_dataset: str | None
    calibration_sha256: str | None
    calibration_nsamples: int | None
    calibration_seqlen: int | None
    calibration_seed: int | None
    engine: str
    runner: str
    image: str | None
    image_digest: str | None
    profile: str
    device: str
    dtype: str
    evaluation: str | None = Field(description="the compressed eval's settings: tracks, limit, ppl windows, shots")
    dense_baseline: str | None = Field(description="job hash of the dense evaluation the cell is scored against")
    environment: str | None = Field(description="torch / transformers / lm-eval of the compress job (and the upstream engine's own stack)")
    source: str


FAIRNESS_FIELDS: dict[str, str] = {
    "calibration_dataset": "calibration data",
    "calibration_sha256": "calibration sha256",
    "calibration_nsamples": "nsamples",
    "calibration_seqlen": "seqlen",
    "calibration_seed": "seed",
    "engine": "engine",
    "runner": "runner",
    "image": "image",
    "image_digest": "image digest",
    "profile": "profile",
    "device": "device",
    "dtype": "dtype",
    "evaluation": "eval settings",
    "dense_baseline": "dense baseline",
    "environment": "environment",
}


class CellReport(_Record):
    method: str
    preset: str
    setting: str = Field(description="the preset, plus the params that tell two runs of one preset apart")
    engine: str
    params: dict
    compress: RunRef
    compressed_eval: RunRef | None
    dense_eval: RunRef | None
    metrics: list[MetricCell]
    track3: Track3Cell
    oms: list[OMCell]
    fairness: Fairness
    notes: list[str] = Field(default_factory=list, description="why a track or OM is missing")


class GroupReport(_Record):
    """The cells compared with each other: one model (by identity) under one profile."""

    model: str
    model_identity: str
    profile: str
    paper_model: str | None
    cells: list[CellReport]
    fairness_flags: list[str] = Field(description="Fairness fields that differ between the group's cells")


class PaperRow(_Record):
    """One measured quantity next to the paper's figure for the same model, method and setting."""

    model: str
    paper_model: str
    method: str
    setting: str
    paper_method: str
    paper_setting: str
    profile: str
    quantity: str
    label: str
    unit: str
    measured: float
    paper: float
    delta: float
    tolerance: str
    verdict: Literal["ok", "outside", "n/a"]
    source: str
    paper_table: str


class RunProblem(_Record):
    path: str
    status: Literal["failed", "untrusted", "incomplete"]
    message: str


class StoreReport(_Record):
    schema_version: str = SCHEMA_VERSION
    generator: str
    profiles: list[str]
    n_runs: int
    groups: list[GroupReport]
    paper: list[PaperRow]
    paper_notes: list[str]
    runs: list[RunRef]
    problems: list[RunProblem]
