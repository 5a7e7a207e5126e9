"""The model registry: the paper's models as data (`model_registry.toml`), validated once.

`--model` accepts a registry name (`llama-2-7b`), a hub id, a local HF dir, or nothing (the
embedded default). A registry entry carries what must be checked *before* anything runs:
gated repos need a token, models with their own modelling code need the user's explicit
opt-in (`--trust-remote-code`), and the methods that support the architecture. Those
checks are here, each a one-line `UserError`.
"""

from __future__ import annotations

import functools
import os
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError

REGISTRY_FILE = Path(__file__).with_name("model_registry.toml")
REFERENCE_ARCHS = {"llama"}  # what the reference engines' block-wise runner supports


class RegisteredModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    hub_id: str
    revision: str = Field(default="", description="pinned commit; empty = resolved and recorded at run time")
    family: str
    arch: str
    params_b: float = Field(gt=0)
    gated: bool = False
    trust_remote_code: bool = False
    embedded: bool = False
    tracks: list[int]
    methods: list[str]

    @field_validator("revision")
    @classmethod
    def _commit(cls, v: str) -> str:
        if v and (len(v) != 40 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError(f"revision {v!r} is not a 40-hex commit")
        return v

    def supports(self, method: str, engine: str) -> str | None:
        """None when `method` (with `engine`) can compress this model, else the reason."""
        if method not in self.methods:
            return f"{method} does not support {self.family} ({self.arch}) upstream"
        if engine == "reference" and self.arch not in REFERENCE_ARCHS:
            return f"the reference engine of {method} supports LLaMA-architecture models only, not {self.arch}: use --engine upstream"
        archs = upstream_archs(method) if engine == "upstream" else None
        if archs is not None and self.arch not in archs:
            # `methods` are the paper's Table 2 cells; this harness's adapter may run fewer
            return (f"the upstream engine of {method} runs {', '.join(sorted(archs))} models here, not {self.arch} "
                    "(the paper's cell needs upstream code this adapter does not run)")
        return None


def upstream_archs(method: str) -> set[str] | None:
    """The model_types a method's upstream adapter runs (its SUPPORTED_ARCHS), None if it says not."""
    from .registry import get_method

    spec = get_method(method)
    if "upstream" not in spec.engines:
        return None
    return getattr(spec.engine_module("upstream"), "SUPPORTED_ARCHS", None)


@functools.cache
def load_registry(path: Path = REGISTRY_FILE) -> dict[str, RegisteredModel]:
    try:
        raw = tomllib.loads(Path(path).read_text())
        models = [RegisteredModel.model_validate(m) for m in raw.get("model", [])]
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as e:
        raise UserError(f"{path}: invalid model registry ({str(e).splitlines()[0]})") from None
    out: dict[str, RegisteredModel] = {}
    for m in models:
        if m.name in out:
            raise UserError(f"{path}: model {m.name} is listed twice")
        out[m.name] = m
    return out


def lookup(spec: str) -> RegisteredModel | None:
    """The registry entry named `spec` (its short name or its hub id, any case), or None."""
    key = spec.strip().lower()
    for m in load_registry().values():
        if key in (m.name, m.hub_id.lower()):
            return m
    return None


def hub_token() -> str | None:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - an old hub client: no stored token
        return None


def check_access(entry: RegisteredModel, trust_remote_code: bool) -> None:
    """The checks a registry entry asks for, before anything is downloaded or written."""
    if entry.trust_remote_code and not trust_remote_code:
        raise UserError(f"model {entry.name} ({entry.hub_id}) runs its own modelling code from the hub: "
                        "pass --trust-remote-code to allow it (off by default)")
    if entry.gated and not hub_token():
        raise UserError(f"model {entry.name} ({entry.hub_id}) is gated: accept its licence on huggingface.co "
                        "and set HF_TOKEN (or run `huggingface-cli login`)")
