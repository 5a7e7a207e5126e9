"""Track 5, hardware acceleration: decode tokens/s of an artifact on a deploy backend.

`evaluate_deploy` is what a deploy job runs: the backend prepares the artifact for its
category (backends.py), then protocol.py measures it the same way for every backend.
"""

from __future__ import annotations

from .backends import BACKENDS, CATEGORIES, category, check_backend, prepare_native
from .protocol import (check_compiler, compare_with_eager, compile_mode, compiled_decode, hf_generate, measure,
                       release_load_memory)

__all__ = ["BACKENDS", "CATEGORIES", "category", "check_backend", "evaluate_deploy"]


def evaluate_deploy(model, declaration, settings, device) -> dict:
    check_backend(settings.backend, str(device))
    prepared = prepare_native(model, declaration, device)
    if device.type == "cpu":
        release_load_memory(prepared.model)
    if settings.compile:
        check_compiler(device)
        mode = compile_mode(device)
        compiled_decode(prepared.model, mode=mode, all_devices=device.type != "cuda")
        prepared.notes.append(f"decode steps under torch.compile (static KV cache, mode={mode}); the prefill eager")
    figures = measure(hf_generate(prepared.model), prepared.model.config.vocab_size, device, settings.prompt_tokens,
                      settings.new_tokens, settings.warmup, settings.repeats, settings.batch_sizes)
    extra = {}
    if settings.compile:
        if not hasattr(prepared.model, "_compiled_call"):  # a figure labelled compiled must be
            raise RuntimeError("--compile: generate decoded eagerly (transformers' compile criteria not met on this model)")
        extra["compiled_vs_eager"] = compare_with_eager(prepared.model, settings.prompt_tokens, settings.new_tokens)
        if extra["compiled_vs_eager"]["first_difference"] is not None:
            prepared.notes.append(f"compiled greedy tokens differ from eager from new token "
                                  f"{extra['compiled_vs_eager']['first_difference']} of {settings.new_tokens}")
    if device.type == "cpu":  # beside the vllm backend's: the cores its worker decoded on
        import torch

        extra["cpu_threads"] = torch.get_num_threads()
    return {"backend": settings.backend, "category": prepared.category, "accelerated": prepared.accelerated,
            "kernel": prepared.kernel, "compiled": settings.compile, **extra, "notes": prepared.notes,
            "requantization_max_abs_err": prepared.max_abs_err, "prompt_tokens": settings.prompt_tokens,
            "new_tokens": settings.new_tokens, **figures}
