"""Where task and calibration data come from: the hub when online, a local data dir otherwise.

A local data dir mirrors the hub datasets the tracks read: `hf/<hub id with / as __>/
<config>/<split>.jsonl` (the layout of ../shared/data/hf). The project ships the slices
its default run needs in `tracks/data/` (see tracks/data/SOURCES.md), so the embedded
default runs with no network at all.

A job that reads a local data dir carries its content digest (`data_digest`), so a cell
computed on one dataset is never served as cached for another; the same content in
another folder is the same job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .errors import UserError
from .fsio import tree_digest, user_path
from .models import hub_reachable, local_dir_digest

SHIPPED_DATA = Path(__file__).resolve().parents[1] / "tracks" / "data"
CALIBRATION_FILE = "hf/allenai__c4/en/train.jsonl"


def resolve_data(data_dir: str | None, mode: Literal["auto", "local", "hub"] = "auto") -> tuple[Literal["local", "hub"], Path]:
    """Returns (source, local dir). The local dir is staged into `/data` either way: with
    source 'hub' the job reads the hub (and the dir is only a fallback for calibration)."""
    if data_dir:
        path = user_path(data_dir, "data dir").resolve()
        if not (path / "hf").is_dir():
            raise UserError(f"data dir {data_dir} has no hf/ folder: expected hf/<hub id with / as __>/<config>/<split>.jsonl")
        if next((path / "hf").glob("*/*/*.jsonl"), None) is None:  # found here, not in every job's log
            raise UserError(f"data dir {data_dir} has no slices: expected hf/<hub id with / as __>/<config>/<split>.jsonl")
        return "local", path
    if mode == "hub" or (mode == "auto" and hub_reachable()):
        return "hub", SHIPPED_DATA
    return "local", SHIPPED_DATA


def data_digest(path: Path) -> str:
    """Content digest of a local data dir: `models.local_dir_digest` (per-file sha256 cached
    by path, size and mtime, so a repeat plan only stats the files). A folder linked in from
    elsewhere counts with its content (the digest's walk does not enter linked folders; the
    runners stage their targets), named by where it sits in the dir."""
    root = Path(path)
    try:
        return _digest(root, {root.resolve()})
    except OSError as e:
        raise UserError(f"data dir {path}: cannot read {e.filename or ''} ({e.strerror or type(e).__name__})") from None


def _digest(root: Path, seen: set[Path]) -> str:
    linked = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() and p.is_dir() and p.resolve() not in seen:
            linked[p.relative_to(root).as_posix() + "/"] = _digest(p, seen | {p.resolve()})
    own = local_dir_digest(root)
    return tree_digest({"": own, **linked}) if linked else own
