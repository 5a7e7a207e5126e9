"""One measurement protocol for every deploy backend (SPEC 5 track 5).

Batch-1 greedy decode of a fixed prompt (seeded random token ids of `prompt_tokens`), exactly
`new_tokens` new tokens (EOS ignored), after `warmup` untimed runs; the figure is the median
of `repeats` timed runs of new tokens / wall time. A batched throughput figure per extra
batch size, and the peak memory of the timed runs (GPU: torch's peak reserved; CPU: the
process's peak RSS, reset before the runs, so neither device counts what loading and
preparing the model took).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable

import torch

from .measure_common import peak_rss, reset_peak_rss


def prompt_ids(vocab_size: int, prompt_tokens: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, max(101, vocab_size - 1), (batch, prompt_tokens), generator=g)


def time_decode(generate: Callable[[torch.Tensor, int], None], ids: torch.Tensor, new_tokens: int, warmup: int,
                repeats: int, sync: Callable[[], None]) -> dict:
    for _ in range(warmup):
        generate(ids, new_tokens)
    sync()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(ids, new_tokens)
        sync()
        runs.append(time.perf_counter() - t0)
    median = statistics.median(runs)
    return {"tokens_per_s": ids.shape[0] * new_tokens / median, "median_s": median, "runs_s": runs}


def compiled_decode(model, fullgraph: bool = True, mode: str = "reduce-overhead", all_devices: bool = False) -> None:
    """Let `generate` decode under torch.compile, transformers' own way (in place).

    A static KV cache makes every one-token decode step the same shapes, and with it `generate`
    compiles the step itself (`get_compiled_call`; the prefill stays eager) and copies the logits
    it keeps. Wrapping `model.forward` by hand instead compiled the prefill too and kept a CUDA
    graph's output across steps: on a lent H200 that failed with "accessing tensor output of
    CUDAGraphs that has been overwritten by a subsequent run". transformers compiles on GPUs
    only unless `all_devices` (its switch for testing on the CPU).
    """
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=fullgraph, mode=mode)
    if all_devices:
        config._compile_all_devices = True
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = config


def check_compiler(device: torch.device) -> None:
    """torch.compile builds native code at run time: C++ through inductor on the CPU, Triton's
    C launcher on a GPU. Without a compiler on PATH it fails deep in inductor; say so first
    (a ValueError: the job's environment, e.g. an image without gcc, cannot compile)."""
    import os
    import shutil

    names = (os.environ.get("CXX"), "g++", "clang++", "c++") if device.type == "cpu" else (os.environ.get("CC"), "cc", "gcc", "clang")
    if not any(n and shutil.which(n) for n in names):
        raise ValueError(f"--compile needs a {'C++' if device.type == 'cpu' else 'C'} compiler on PATH for torch.compile "
                         f"({', '.join(n for n in names if n)}): none found in this environment")


def compile_mode(device: torch.device) -> str:
    """CUDA graphs on a GPU (the per-token launch overhead is what eager decode loses);
    inductor's default elsewhere, where there are no CUDA graphs to take."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def compare_with_eager(model, prompt_tokens: int, new_tokens: int) -> dict:
    """The timed prompt decoded once more through the compiled step and once eagerly: where
    their greedy tokens first differ (None: nowhere). Fused kernels may round differently, so a
    late difference at a near-tie can be honest; one at the first tokens says the compiled
    model is not the model (as when torch's compiled CPU int8 GEMM returned garbage for a
    one-token step: tokens/s alone did not show it)."""
    ids = prompt_ids(model.config.vocab_size, prompt_tokens)
    compiled = greedy(model, ids, new_tokens)[0, prompt_tokens:]
    eager = greedy(model, ids, new_tokens, disable_compile=True)[0, prompt_tokens:]
    differ = (compiled != eager).nonzero()
    return {"tokens": int(eager.numel()), "first_difference": int(differ[0, 0]) if len(differ) else None}


def greedy(model, ids: torch.Tensor, n: int, **generate_kwargs) -> torch.Tensor:
    """Greedy decode through transformers' `generate`, with exactly `n` new tokens (EOS ignored)."""
    with torch.inference_mode():
        return model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **generate_kwargs)


def hf_generate(model) -> Callable[[torch.Tensor, int], None]:
    """`greedy` as the protocol times it."""

    def run(ids: torch.Tensor, n: int) -> None:
        greedy(model, ids, n)

    return run


def release_load_memory(model) -> None:
    """CPU: hand back to the system what loading and preparing the model left resident, so that
    the decode's peak RSS is the model's. Each parameter is copied out of the checkpoint's
    memory map (its file pages stay resident and counted while any tensor maps them, the
    dequantized weights an int kernel replaced included: on the embedded SmolLM2 an int8 model
    measured 1.17 GB against dense's 0.95), then glibc's allocator returns its free memory
    (malloc_trim, where there is one)."""
    import ctypes
    import gc

    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                param.data = param.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its free memory stays with the process
        pass


def measure(generate, vocab_size: int, device: torch.device, prompt_tokens: int, new_tokens: int, warmup: int,
            repeats: int, batch_sizes: list[int]) -> dict:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = device.type != "cuda" and reset_peak_rss([os.getpid()])
    out = {"batch1": time_decode(generate, prompt_ids(vocab_size, prompt_tokens), new_tokens, warmup, repeats, sync),
           "throughput": {}}
    for b in batch_sizes:
        if b > 1:
            out["throughput"][str(b)] = time_decode(generate, prompt_ids(vocab_size, prompt_tokens, b), new_tokens, 1,
                                                    max(1, repeats // 2), sync)["tokens_per_s"]
    out["tokens_per_s"] = out["batch1"]["tokens_per_s"]
    if device.type == "cuda":
        out["peak_memory_bytes"], out["memory_kind"] = torch.cuda.max_memory_reserved(device), "gpu_reserved"
    elif rss_reset:
        out["peak_memory_bytes"], out["memory_kind"] = peak_rss([os.getpid()]), "host_rss"
    else:  # no reset here (not Linux): the process's lifetime peak, load included, labelled so
        out["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["memory_kind"] = "host_rss_max_process"
    return out
