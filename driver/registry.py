"""Method discovery: every `methods/<name>/method.toml` is a method; nothing else lists them.

Adding a method is one folder (STYLE.md "Adding a thing touches one folder"): the driver
finds it here, validates its declaration, and imports its engine module by name.
"""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError

METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"


class Upstream(BaseModel):
    model_config = ConfigDict(extra="allow")
    repo: str
    commit: str
    license: str | None = None


class CalibrationDefaults(BaseModel):
    model_config = ConfigDict(extra="allow")
    dataset: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    kind: str
    title: str | None = None
    paper_preset: str | None = None
    upstream: Upstream
    calibration: CalibrationDefaults | None = None
    engines: dict[str, dict[str, Any]] = Field(default_factory=dict)
    presets: dict[str, dict[str, Any]]
    # [profiles.<profile>]: param overrides a harness profile applies on top of every preset
    # (e.g. OmniQuant's quick profile trains 2 epochs instead of 20); the job records the result.
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    folder: Path | None = None

    def preset(self, name: str | None) -> tuple[str, dict[str, Any]]:
        name = name or self.paper_preset or next(iter(self.presets))
        if name not in self.presets:
            raise UserError(f"unknown preset '{name}' for {self.name}: choose one of {', '.join(self.presets)}")
        return name, dict(self.presets[name])

    def profile_params(self, profile: str) -> dict[str, Any]:
        return dict(self.profiles.get(profile, {}))

    def engine_module(self, engine: str):
        if engine not in self.engines:
            raise UserError(f"{self.name} has no '{engine}' engine here: available {', '.join(self.engines) or 'none'}")
        module = self.engines[engine].get("module", engine)
        return importlib.import_module(f"llmcbench.methods.{self.name}.{module}")


def discover(methods_dir: Path = METHODS_DIR) -> dict[str, MethodSpec]:
    specs = {}
    for toml_path in sorted(methods_dir.glob("*/method.toml")):
        if toml_path.parent.name.startswith("_"):
            continue
        try:
            data = tomllib.loads(toml_path.read_text())
            spec = MethodSpec.model_validate({**data, "folder": toml_path.parent})
        except (tomllib.TOMLDecodeError, ValidationError) as e:
            raise UserError(f"{toml_path}: invalid method declaration ({str(e).splitlines()[0]})") from None
        if spec.name != toml_path.parent.name:
            raise UserError(f"{toml_path}: name '{spec.name}' must equal its folder name '{toml_path.parent.name}'")
        specs[spec.name] = spec
    return specs


def get_method(name: str) -> MethodSpec:
    methods = discover()
    key = name.strip().lower().replace("-", "_")  # llm-pruner -> the llm_pruner folder
    if key not in methods:
        raise UserError(f"unknown method '{name}': choose one of {', '.join(methods) or '(none installed)'}")
    return methods[key]
