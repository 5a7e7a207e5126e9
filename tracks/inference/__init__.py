"""Track 4, inference consumption: MACs (raw and effective), size on disk, inference memory."""

from .measure import (count_macs, eval_inference_memory, inference_memory_bytes, measure_inference_memory, model_size,
                      size_on_disk_bytes)

__all__ = ["count_macs", "eval_inference_memory", "inference_memory_bytes", "measure_inference_memory", "model_size",
           "size_on_disk_bytes"]
