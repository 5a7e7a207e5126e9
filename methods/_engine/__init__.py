"""Plumbing shared by the reference engines: the block-wise calibration runner and the C4
calibration sampler. Each `methods/<name>/reference.py` is then the algorithm alone."""

from .blockwise import (
    BlockInput,
    BlockStep,
    LinearStatistics,
    UnsupportedModelError,
    capture_block_inputs,
    decoder_blocks,
    find_linears,
    run_blockwise,
)
from .output import EngineOutput
from .calibration import CalibrationError, CalibrationSet, load_calibration, sample_calibration, sample_windows

__all__ = [
    "BlockInput",
    "BlockStep",
    "CalibrationError",
    "CalibrationSet",
    "EngineOutput",
    "LinearStatistics",
    "UnsupportedModelError",
    "capture_block_inputs",
    "decoder_blocks",
    "find_linears",
    "load_calibration",
    "run_blockwise",
    "sample_calibration",
    "sample_windows",
]
