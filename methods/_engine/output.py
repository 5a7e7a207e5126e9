"""What an engine's `compress()` may return besides the declaration.

`compress(model, calibration_ids, params, device)` modifies `model` in place (the job saves
it as the HF-loadable artifact) and returns either a `Compression` or an `EngineOutput`.
The latter lets a quantization engine also leave a real low-bit export: `export_packed`
is called with an empty directory (the job's `out/packed/`, written atomically) and
returns the name of the format it wrote (e.g. "gptq", "compressed-tensors"), which the
job records as `compression.json`'s `packed_format`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmcbench.driver.contract import Compression


@dataclass
class EngineOutput:
    declaration: Compression
    export_packed: Callable[[Path], str] | None = None
