"""The upstream engine's adapter interface: job -> upstream command lines -> contract artifact.

Each method's `methods/<name>/upstream.py` defines `ADAPTER`, an `UpstreamAdapter` with
three parts a reviewer can hold against the upstream README:

- `steps(ctx)`: the upstream command lines this job's preset maps to (the paper's
  settings recorded in method.toml), each run through `shim.py` (or, for conversions that
  need upstream's classes importable, our own helper script under the upstream
  interpreter);
- `convert(ctx)`: upstream's output (whatever format the repository writes) into the
  contract's artifact in `ctx.model_out`: an HF-loadable model directory whose
  `compression.json` declaration it returns;
- `parse_metrics(log)`: the figures upstream printed about itself (its perplexities), kept
  in `result.json` next to ours.

`methods/_upstream/run.py` does everything around them (staging, time limits, logs, error
classes, atomic output), so an adapter has no I/O policy of its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcbench.driver import numerics
from llmcbench.driver.contract import Compression, Job

SHIM = Path(__file__).with_name("shim.py")
NUMERICS = Path(numerics.__file__)  # the shim loads it by path under upstream's interpreter (its `warm_up_vml` hook)


@dataclass
class StagedData:
    """Files from `/data` that upstream's hard-coded hub loaders are served instead."""

    calibration: Path | None  # the job's calibration documents (C4 en train slice, JSON lines with "text")
    wikitext_test: Path | None  # WikiText-2 raw test (upstream's own perplexity)
    offline: bool = True


@dataclass
class UpstreamContext:
    job: Job
    params: dict[str, Any]
    repo: Path  # the upstream checkout at the pinned commit
    python: str  # the interpreter with upstream's pinned dependencies
    model_dir: Path  # the input model as upstream is given it (staging.stage_model: a copy its stack reads)
    work: Path  # scratch space for upstream's own outputs (under /out, removed after conversion)
    model_out: Path  # where `convert` writes the HF directory (renamed into place by the runner)
    staged: StagedData
    device: str = "cpu"
    source_model_dir: Path | None = None  # the input HF model directory (under /models), when model_dir is a staged copy

    @property
    def calibration(self):
        return self.job.calibration

    @property
    def input_model(self) -> Path:
        """The input model's own files: the artifact takes its tokenizer and config from here,
        never from the copy staged for upstream's older stack."""
        return self.source_model_dir or self.model_dir

    @property
    def input_config(self) -> dict[str, Any]:
        """The input model's config.json ({} without one: upstream's loader then says what is
        missing), which the adapters' up-front checks read."""
        config = self.input_model / "config.json"
        return json.loads(config.read_text()) if config.is_file() else {}


@dataclass
class Step:
    """One upstream (or helper) process."""

    name: str
    script: str  # a path relative to the upstream checkout, run through the shim; or an absolute helper script
    argv: list[str]
    time: list[str] = field(default_factory=list)  # `module:function` targets whose time is the compression time
    # shim save hooks: {"after": target, "arg": i | "kw": name | "model": "return", "dir": path | "torch_save": file}
    save: list[dict[str, Any]] = field(default_factory=list)
    compress: bool = False  # the whole step is compression time (when no `time` target can isolate it)
    helper: bool = False  # our own script (no shim, no dataset redirects), e.g. an unpickling converter
    env: dict[str, str] = field(default_factory=dict)
    unused_splits: list[str] = field(default_factory=list)  # e.g. "c4:validation"; see staging.dataset_rules
    outputs: list[str] = field(default_factory=list)  # what upstream itself writes: once there, unstaged eval data ends the step

    def describe(self) -> str:
        return " ".join([Path(self.script).name, *self.argv])


class UpstreamAdapter:
    """Subclass per method; `method` names the folder."""

    method: str = ""
    # upstream perplexity lines: a regex with groups (dataset, value) or a named-group mapping
    metric_patterns: tuple[str, ...] = ()

    def steps(self, ctx: UpstreamContext) -> list[Step]:
        raise NotImplementedError

    def convert(self, ctx: UpstreamContext) -> Compression:
        raise NotImplementedError

    def own_eval_window(self, ctx: UpstreamContext) -> int:
        """The longest window upstream's own WikiText-2 perplexity uses: 2048 tokens (GPTQ,
        SparseGPT, AWQ, SmoothQuant, OmniQuant hard-code it) or the model's context (Wanda's
        `model.seqlen = max_position_embeddings`). A cut test text keeps at least this many."""
        return max(2048, int(ctx.input_config.get("max_position_embeddings") or 0))

    def parse_metrics(self, log: str) -> dict[str, float]:
        """Upstream's own figures from its log, e.g. {"wikitext2_ppl": 5.68}; the last one wins."""
        found: dict[str, float] = {}
        for pattern in self.metric_patterns:
            for m in re.finditer(pattern, log, flags=re.MULTILINE):
                groups = m.groupdict()
                key = groups.get("key") or m.group(1)
                value = groups.get("value") or m.group(2)
                try:
                    found[f"{key.strip().lower()}_ppl"] = float(value)
                except ValueError:
                    continue
        return found


def flag(name: str, value: Any) -> list[str]:
    """`--name value`, or nothing for None."""
    return [] if value is None else [name, str(value)]


def switch(name: str, on: bool) -> list[str]:
    return [name] if on else []
