"""The volume contract's typed records: job, result, compression declaration.

Everything that crosses the driver/container boundary is one of these models,
validated on read (SPEC.md section 4, STYLE.md "Typed records at every boundary").
Names carry their units (`wall_s`, `peak_rss_bytes`) so a reader never guesses.

A job's identity is the sha256 of its canonical JSON (sorted keys, no whitespace)
plus the identity of the environment that runs it (image digest for the docker
runner, the package version for the local runner): the same job run twice is the
same hash in any process, so a finished one is a cache hit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = "1"

JobKind = Literal["compress", "eval", "deploy"]
Engine = Literal["reference", "upstream"]
Profile = Literal["quick", "paper"]


class ContractError(ValueError):
    """A contract file is missing, unreadable, of another schema version, or tampered with."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelRef(_Record):
    """An input model: a hub id (+ revision), a local HF dir, or a compress job's artifact.

    `identity` is what enters the job hash: `hub:<id>@<revision>`, `sha256:<content hash>`
    of a local dir, or `artifact:<compress job hash>`. Paths never enter the hash, so the
    same model in another directory is the same job.
    """

    name: str
    source: Literal["hub", "local", "artifact", "embedded"]
    identity: str
    path: str | None = Field(default=None, description="host path; excluded from the job hash")
    artifact_sha256: str | None = Field(default=None, description=(
        "an artifact's content when the job ran (`artifact_digest` of its compress result); excluded from "
        "the job hash, which is planned before the compress job runs: a cached job whose artifact was "
        "recomputed with other weights is stale"))
    revision: str | None = None
    trust_remote_code: bool = False


class Calibration(_Record):
    dataset: str = "c4"
    nsamples: int = Field(gt=0)
    seqlen: int = Field(gt=0)
    seed: int = 0
    source: Literal["hub", "local"] = "local"
    data_sha256: str | None = Field(default=None, description="hash of the calibration file used")
    data_dir_sha256: str | None = Field(
        default=None, description="content digest of the local data dir staged at /data (driver.data.data_digest); "
                                  "None when the data comes from the hub. Enters the job hash; the dir's path never does")


class EvalSettings(_Record):
    """What the evaluation side runs: tracks, tasks, and per-profile limits."""

    tracks: list[int]
    tasks: list[str] = Field(default_factory=list, description="track-1 datasets")
    limit: int | None = Field(default=None, description="examples per task (None: full)")
    ppl_seqlen: int = 2048
    ppl_max_windows: int | None = None
    mmlu_shots: int = 0
    max_new_tokens: int = Field(default=32, description="track 7: greedy generation budget per answer")
    kick_instruction: bool = Field(default=False, description="track 7: also answer the instruction-following "
                                                              "questions (for a judge, which the driver asks afterwards)")
    batch_size: int = 16
    macs_seqlen: int = 128
    data_source: Literal["hub", "local"] = "local"
    data_dir_sha256: str | None = Field(
        default=None, description="content digest of the local data dir staged at /data (driver.data.data_digest); "
                                  "None when the data comes from the hub. Enters the job hash; the dir's path never does")


class DeploySettings(_Record):
    """Track 5: which backend runs the artifact and the measurement protocol (tracks/acceleration)."""

    backend: str = "torch_native"
    prompt_tokens: int = Field(default=128, gt=0)
    new_tokens: int = Field(default=256, gt=0, description="decoded per run, EOS ignored")
    warmup: int = Field(default=1, ge=0)
    repeats: int = Field(default=5, ge=1, description="timed runs; the median is the figure")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], description="1: the figure; others: throughput")
    compile: bool = Field(default=False, description="torch_native: decode steps under torch.compile over a static KV cache; "
                          "vllm: its own compilation on CPU too (on CUDA it always compiles, with CUDA graphs)")


class Limits(_Record):
    time_limit_s: int = Field(default=3600, gt=0)
    memory_bytes: int | None = None


def setting_label(preset: str | None, params: dict[str, Any], keys: Iterable[str]) -> str:
    shown = sorted(k for k in set(keys) if k in params)
    label = preset or "-"
    return label + (" (" + ", ".join(f"{k}={params[k]}" for k in shown) + ")" if shown else "")


class Job(_Record):
    schema_version: str = SCHEMA_VERSION
    kind: JobKind
    method: str = Field(description="'dense' for the uncompressed baseline")
    preset: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, Any] | None = Field(
        default=None, description="the params set over the preset's own (and its profile's): such a run is not the preset's setting")
    engine: Engine = "reference"
    model: ModelRef
    calibration: Calibration | None = None
    evaluation: EvalSettings | None = None
    deploy: DeploySettings | None = None
    profile: Profile = "quick"
    device: str = "cpu"
    dtype: str = "float32"
    limits: Limits = Field(default_factory=Limits)

    @field_validator("schema_version")
    @classmethod
    def _same_schema(cls, v: str) -> str:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema version {v} != {SCHEMA_VERSION}")
        return v

    def identity_dict(self) -> dict[str, Any]:
        """The fields that define what is computed: host paths and limits excluded; `overrides`,
        `deploy.compile` and the data dir digests only when set, so the jobs of stores written
        before they existed (and jobs that read the hub) keep their hashes."""
        d = self.model_dump(mode="json")
        d["model"].pop("path", None)
        d["model"].pop("artifact_sha256", None)
        d.pop("limits", None)
        if d["overrides"] is None:
            del d["overrides"]
        if d["deploy"] is not None and not d["deploy"]["compile"]:
            del d["deploy"]["compile"]
        for part in ("calibration", "evaluation"):
            if d[part] is not None and d[part]["data_dir_sha256"] is None:
                del d[part]["data_dir_sha256"]
        return d

    def setting(self, also: Iterable[str] = ()) -> str:
        """How reports name the run: the preset, with `key=value` for the params set over it
        (and for `also`): only a bare preset name is the preset's setting."""
        return setting_label(self.preset, self.params, {*(self.overrides or {}), *also})

    def job_hash(self, environment_id: str) -> str:
        payload = canonical_json({"job": self.identity_dict(), "environment": environment_id})
        return hashlib.sha256(payload.encode()).hexdigest()


class ErrorInfo(_Record):
    type: str = Field(description="error class: timeout, oom, out_of_disk, crash, bad_input, unsupported, nan_metric; "
                                  "from a cluster also cancelled, preempted, node_fail")
    message: str


class Environment(_Record):
    python: str | None = None
    torch: str | None = None
    transformers: str | None = None
    lm_eval: str | None = None
    cuda: str | None = None
    gpu_name: str | None = None
    driver: str | None = None
    platform: str | None = None
    llmcbench: str | None = None


class Provenance(_Record):
    runner: str = "local"
    image: str | None = None
    image_digest: str | None = None
    upstream_repo: str | None = None
    upstream_commit: str | None = None


class Result(_Record):
    """`result.json`: written last, atomically; `self_sha256` detects a corrupted or edited file."""

    schema_version: str = SCHEMA_VERSION
    job_hash: str
    status: Literal["ok", "failed"]
    error: ErrorInfo | None = None
    started_at: str
    finished_at: str
    wall_s: float
    load_s: float | None = None
    compress_s: float | None = Field(default=None, description="the compression step alone")
    save_s: float | None = None
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    environment: Environment = Field(default_factory=Environment)
    provenance: Provenance = Field(default_factory=Provenance)
    input_sha256: dict[str, str] = Field(default_factory=dict)
    output_sha256: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    self_sha256: str | None = None

    def sealed(self) -> "Result":
        body = self.model_dump(mode="json", exclude={"self_sha256"})
        return self.model_copy(update={"self_sha256": _sha(canonical_json(body))})

    def check_seal(self) -> None:
        body = self.model_dump(mode="json", exclude={"self_sha256"})
        if self.self_sha256 != _sha(canonical_json(body)):
            raise ContractError("checksum mismatch (file edited or corrupted)")


class LayerCompression(_Record):
    sparsity: float | None = None
    weight_bits: int | None = None
    shape: list[int] | None = None


class Compression(_Record):
    """`compression.json`: how to run the artifact faithfully (SPEC.md section 4)."""

    schema_version: str = SCHEMA_VERSION
    method: str
    preset: str | None = None
    engine: Engine = "reference"
    sparsity_pattern: Literal["none", "unstructured", "n:m", "structured"] = "none"
    n_m: tuple[int, int] | None = None
    target_sparsity: float | None = None
    measured_sparsity: float | None = Field(default=None, description="over the compressed linears")
    weight_bits: int = 16
    act_bits: int = 16
    group_size: int | None = None
    symmetric: bool | None = None
    act_granularity: Literal["none", "per_token", "per_tensor"] = "none"
    smoothing_folded: bool = Field(default=False, description=(
        "per-channel scales moved from the linears' inputs into the op before them (SmoothQuant's "
        "smoothing, AWQ's activation-aware scales, OmniQuant's LET) are already in the stored "
        "weights and norms: the linears hold W*s, not W"))
    packed_format: str | None = None
    layers: dict[str, LayerCompression] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


COMPRESSION_FILE = "compression.json"


def read_compression(model_dir: Path) -> Compression | None:
    """A model dir's `compression.json`, None for a model without one (dense)."""
    path = Path(model_dir) / COMPRESSION_FILE
    return read_record(path, Compression) if path.is_file() else None


def artifact_digest(result: "Result") -> str:
    """One sha256 over what a compress job left (its result's `output_sha256`: the model's and
    the packed export's files), recorded in the job.json of every job that reads the artifact."""
    return _sha(canonical_json(result.output_sha256))


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_record(path: Path, cls: type[BaseModel]):
    """Read and validate one contract file; every failure is a one-line ContractError."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ContractError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ContractError(f"{path}: not valid JSON ({e.__class__.__name__})") from None
    if isinstance(raw, dict) and raw.get("schema_version") not in (None, SCHEMA_VERSION):
        raise ContractError(
            f"{path}: schema version {raw.get('schema_version')} but this llmcbench reads {SCHEMA_VERSION}"
        )
    try:
        record = cls.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ContractError(f"{path}: invalid {cls.__name__} ({where}: {first['msg']})") from None
    if isinstance(record, Result):
        try:
            record.check_seal()
        except ContractError as e:
            raise ContractError(f"{path}: {e}") from None
    return record
