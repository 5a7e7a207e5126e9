"""Method discovery: every `methods/<name>/method.toml` is a method; nothing else lists them.

Adding a method is one folder (STYLE.md "Adding a thing touches one folder"): the driver
finds it here, validates its declaration, and imports its engine module by name.
"""

from __future__ import annotations

import importlib
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError
from .fsio import user_path

METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"


class UpstreamImage(BaseModel):
    """`[upstream.image]`: the pinned stack upstream's code runs on inside the method image
    (its own venv, images/Dockerfile.method), apart from the harness's base venv."""

    model_config = ConfigDict(extra="forbid")
    python: str = Field(description="the Python upstream states (recorded; the image's interpreter is the base's)")
    torch: str
    torch_index: str | None = Field(default=None, description="pip index for the torch wheel (its CUDA build)")
    requirements: list[str] = Field(default_factory=list, description="pinned pip requirements upstream runs with")
    build: list[str] = Field(default_factory=list, description="shell commands run in the checkout after install")
    patches: list[str] = Field(default_factory=list, description="files under the method folder, applied with git apply")
    build_files: list[str] = Field(default_factory=list, description="files under the method folder the build commands run "
                                   "(in $LLMCBENCH_BUILD_FILES at build time), e.g. a script too long for one line")
    env: dict[str, str] = Field(default_factory=dict, description="build environment, e.g. TORCH_CUDA_ARCH_LIST")


class Upstream(BaseModel):
    model_config = ConfigDict(extra="allow")
    repo: str
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    license: str | None = None
    # preset -> the upstream command line(s) its adapter builds, one per step
    # ({model}, {work}, {calibration} placeholders)
    commands: dict[str, str | list[str]] = Field(default_factory=dict)
    image: UpstreamImage | None = None


class CalibrationDefaults(BaseModel):
    model_config = ConfigDict(extra="allow")
    dataset: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


class ParitySettings(BaseModel):
    """`[parity]`: params `llmcbench parity` sets on both engines, so that they compare the same
    thing (e.g. LLM-Pruner's pruning without the LoRA recovery that upstream runs on data of its
    own), and why; the parity record notes both."""

    model_config = ConfigDict(extra="forbid")
    params: dict[str, Any] = Field(default_factory=dict)
    why: str | None = None


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    kind: str
    title: str | None = None
    paper_preset: str | None = None
    # the preset of the paper's track 2 (Table 2) when it differs from the paper preset
    # (GPTQ/AWQ W4A16 g128, SmoothQuant/OmniQuant W4A4); the paper preset otherwise
    track2_preset: str | None = None
    upstream: Upstream
    calibration: CalibrationDefaults | None = None
    engines: dict[str, dict[str, Any]] = Field(default_factory=dict)
    presets: dict[str, dict[str, Any]]
    # [profiles.<profile>]: param overrides a harness profile applies on top of every preset
    # (e.g. OmniQuant's quick profile trains 2 epochs instead of 20); the job records the result.
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    parity: ParitySettings = Field(default_factory=ParitySettings)
    folder: Path | None = None

    def preset(self, name: str | None) -> tuple[str, dict[str, Any]]:
        name = name or self.paper_preset or next(iter(self.presets))
        if name not in self.presets:
            raise UserError(f"unknown preset '{name}' for {self.name}: choose one of {', '.join(self.presets)}")
        return name, dict(self.presets[name])

    def presets_for(self, selector: str) -> list[str]:
        """Presets named by a matrix selector: `paper`, `track2`, `all`, or a preset name."""
        if selector == "paper":
            return [self.preset(None)[0]]
        if selector == "track2":
            return [self.preset(self.track2_preset)[0]]
        if selector == "all":
            return list(self.presets)
        return [self.preset(selector)[0]]

    def profile_params(self, profile: str) -> dict[str, Any]:
        return dict(self.profiles.get(profile, {}))

    @property
    def packaged(self) -> bool:
        """Whether the method's folder is the package's own methods/<name>/ (importable as
        llmcbench.methods.<name>) rather than a folder on LLMCBENCH_METHODS_PATH, which is
        imported from its file here and copied into its image by the docker runner."""
        return self.folder is None or self.folder.resolve().parent == METHODS_DIR.resolve()

    def engine_module(self, engine: str):
        if engine not in self.engines:
            raise UserError(f"{self.name} has no '{engine}' engine here: available {', '.join(self.engines) or 'none'}")
        module = self.engines[engine].get("module", engine)
        if not self.packaged:
            return _import_file(f"llmcbench_extra_methods.{self.name}.{module}", self.folder / f"{module}.py")
        return importlib.import_module(f"llmcbench.methods.{self.name}.{module}")


def _import_file(name: str, path: Path):
    """An engine of a method folder outside the package (LLMCBENCH_METHODS_PATH)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not path.is_file():
        raise UserError(f"engine module {path} does not exist")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def method_dirs() -> list[Path]:
    """The package's methods/ plus any folders in LLMCBENCH_METHODS_PATH (os.pathsep-separated):
    a method developed outside this repository, or a test's deliberately failing method."""
    extra = [user_path(p, "LLMCBENCH_METHODS_PATH") for p in os.environ.get("LLMCBENCH_METHODS_PATH", "").split(os.pathsep) if p]
    for folder in extra:
        if not folder.is_dir():  # a typo would hide the method behind "unknown method"
            raise UserError(f"LLMCBENCH_METHODS_PATH names {folder}, which is not a folder: "
                            f"give folders holding <method>/method.toml, separated by '{os.pathsep}'")
    return [METHODS_DIR, *extra]


def discover(methods_dir: Path | None = None) -> dict[str, MethodSpec]:
    specs = {}
    tomls = sorted(methods_dir.glob("*/method.toml")) if methods_dir else [
        t for d in method_dirs() for t in sorted(d.glob("*/method.toml"))]
    for toml_path in tomls:
        if toml_path.parent.name.startswith("_"):
            continue
        try:
            data = tomllib.loads(toml_path.read_text())
            spec = MethodSpec.model_validate({**data, "folder": toml_path.parent})
        except (tomllib.TOMLDecodeError, ValidationError, UnicodeDecodeError) as e:
            raise UserError(f"{toml_path}: invalid method declaration ({str(e).splitlines()[0]})") from None
        if spec.name != toml_path.parent.name:
            raise UserError(f"{toml_path}: name '{spec.name}' must equal its folder name '{toml_path.parent.name}'")
        if spec.name in specs:
            raise UserError(f"{toml_path}: method '{spec.name}' is already defined by {specs[spec.name].folder}")
        specs[spec.name] = spec
    return specs


def get_method(name: str) -> MethodSpec:
    methods = discover()
    key = name.strip().lower().replace("-", "_")  # llm-pruner -> the llm_pruner folder
    if key not in methods:
        raise UserError(f"unknown method '{name}': choose one of {', '.join(methods) or '(none installed)'}")
    return methods[key]
