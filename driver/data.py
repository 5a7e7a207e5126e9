"""Where task and calibration data come from: the hub when online, a local data dir otherwise.

A local data dir mirrors the hub datasets the tracks read: `hf/<hub id with / as __>/
<config>/<split>.jsonl` (the layout of ../shared/data/hf). The project ships the slices
its default run needs in `tracks/data/` (see tracks/data/SOURCES.md), so the embedded
default runs with no network at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .errors import UserError
from .models import hub_reachable

SHIPPED_DATA = Path(__file__).resolve().parents[1] / "tracks" / "data"
CALIBRATION_FILE = "hf/allenai__c4/en/train.jsonl"


def resolve_data(data_dir: str | None, mode: Literal["auto", "local", "hub"] = "auto") -> tuple[Literal["local", "hub"], Path]:
    """Returns (source, local dir). The local dir is staged into `/data` either way: with
    source 'hub' the job reads the hub (and the dir is only a fallback for calibration)."""
    if data_dir:
        path = Path(data_dir).expanduser().resolve()
        if not (path / "hf").is_dir():
            raise UserError(f"data dir {data_dir} has no hf/ folder: expected hf/<hub id with / as __>/<config>/<split>.jsonl")
        return "local", path
    if mode == "hub" or (mode == "auto" and hub_reachable()):
        return "hub", SHIPPED_DATA
    return "local", SHIPPED_DATA
