"""Helpers for the adapters' tests (`methods/<name>/test_upstream.py`). Not collected by pytest.

CI has no GitHub access, so upstream code never runs in the test suite: the adapter tests
check the command lines against method.toml's recorded upstream commands, and the
conversions against files in upstream's exact output format built in the test (each
test's docstring says which upstream code writes that format and how the test mirrors it).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from llmcbench.driver.contract import Calibration, Job, ModelRef
from llmcbench.driver.jobrun import MODEL_PARTIAL, UPSTREAM_WORK
from llmcbench.driver.registry import get_method

from .adapter import StagedData, UpstreamContext
from .staging import stage_data


def job_for(method: str, preset: str, *, profile: str = "paper", nsamples: int | None = None, seqlen: int | None = None,
            seed: int | None = None, device: str = "cuda", model_name: str = "model", **overrides: Any) -> Job:
    """The compress job the driver would write for `method`/`preset` (paper calibration by default)."""
    spec = get_method(method)
    _, params = spec.preset(preset)
    params.update(spec.profile_params(profile))
    params.update(overrides)
    cal = spec.calibration
    return Job(kind="compress", method=method, preset=preset, params=params, engine="upstream", profile=profile,
               model=ModelRef(name=model_name, source="local", identity="sha256:test"),
               calibration=Calibration(dataset=cal.dataset if cal else "c4", nsamples=nsamples or (cal.nsamples if cal else 128),
                                       seqlen=seqlen or (cal.seqlen if cal else 2048), seed=cal.seed if seed is None and cal else (seed or 0)),
               device=device, dtype="float16" if device.startswith("cuda") else "float32")


def context_for(job: Job, tmp_path: Path, *, model_dir: Path | None = None, data_dir: Path | None = None,
                repo: Path | None = None) -> UpstreamContext:
    """An UpstreamContext with the layout run_upstream uses (work/ and model_out under tmp_path)."""
    work = tmp_path / UPSTREAM_WORK
    work.mkdir(parents=True, exist_ok=True)
    staged = stage_data(data_dir, offline=True) if data_dir else StagedData(calibration=None, wikitext_test=None)
    return UpstreamContext(job=job, params=dict(job.params), repo=repo or tmp_path / "upstream", python="python",
                           model_dir=model_dir or Path("/models") / job.model.name, work=work,
                           model_out=tmp_path / MODEL_PARTIAL, staged=staged, device=job.device)


def recorded_commands(method: str, preset: str) -> list[list[str]]:
    """method.toml's `[upstream.commands]` line(s) for `preset`, one argv per step, split
    like a shell would (the script first)."""
    commands = get_method(method).upstream.commands
    if preset not in commands:
        raise KeyError(f"{method}: method.toml has no [upstream.commands] entry for preset {preset}")
    lines = commands[preset]
    return [shlex.split(line) for line in ([lines] if isinstance(lines, str) else lines)]


def built_commands(ctx: UpstreamContext) -> list[list[str]]:
    """The adapter's steps for `ctx` as argv lists (script first) with placeholders for paths."""
    from importlib import import_module

    adapter = import_module(f"llmcbench.methods.{ctx.job.method}.upstream").ADAPTER
    return [substitute([step.script if not step.helper else Path(step.script).name, *step.argv], ctx)
            for step in adapter.steps(ctx)]


def substitute(argv: list[str], ctx: UpstreamContext) -> list[str]:
    """The adapter's argv with the context's paths replaced by the placeholders method.toml uses:
    {model}, {work}, {calibration}, {wikitext}."""
    mapping = {str(ctx.model_dir): "{model}", str(ctx.work): "{work}"}
    if ctx.staged.calibration:
        mapping[str(ctx.staged.calibration)] = "{calibration}"
    out = []
    for arg in argv:
        for real, placeholder in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
            arg = arg.replace(real, placeholder)
        out.append(arg)
    return out
