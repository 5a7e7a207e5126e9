"""Track 5, hardware acceleration: decode tokens/s of an artifact on a deploy backend.

`evaluate_deploy` is what a deploy job runs: the backend prepares the artifact for its
category (backends.py), then protocol.py measures it the same way for every backend.
"""

from __future__ import annotations

from .backends import BACKENDS, CATEGORIES, category, check_backend, prepare_native
from .protocol import hf_generate, measure

__all__ = ["BACKENDS", "CATEGORIES", "category", "check_backend", "evaluate_deploy"]


def evaluate_deploy(model, declaration, settings, device) -> dict:
    check_backend(settings.backend, str(device))
    prepared = prepare_native(model, declaration, device)
    figures = measure(hf_generate(prepared.model), prepared.model.config.vocab_size, device, settings.prompt_tokens,
                      settings.new_tokens, settings.warmup, settings.repeats, settings.batch_sizes)
    return {"backend": settings.backend, "category": prepared.category, "accelerated": prepared.accelerated,
            "kernel": prepared.kernel, "notes": prepared.notes, "requantization_max_abs_err": prepared.max_abs_err,
            "prompt_tokens": settings.prompt_tokens, "new_tokens": settings.new_tokens, **figures}
