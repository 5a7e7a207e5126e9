"""The measurement protocol's loop for the measure scripts that run in a backend's own
environment (vllm_measure.py, trtllm_measure.py, mlc_measure.py). Imports only torch (every
backend environment has one) and the standard library; the scripts find it next to them.

Same protocol as protocol.py: seeded random prompt token ids (the same generator as
protocol.prompt_ids), `warmup` untimed runs, the median of `repeats` timed runs of exactly
`new_tokens` new tokens per sequence; batched throughput per extra batch size at half the
repeats; the figures written atomically as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable


def protocol_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-sizes", default="1")
    return ap


def prompt_ids(vocab_size: int, prompt_tokens: int, batch: int = 1, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, max(101, vocab_size - 1), (batch, prompt_tokens), generator=g).tolist()


def timed(run: Callable[[list[list[int]]], None], ids: list[list[int]], new_tokens: int, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        run(ids)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(ids)
        runs.append(time.perf_counter() - t)
    median = statistics.median(runs)
    return {"tokens_per_s": len(ids) * new_tokens / median, "median_s": median, "runs_s": runs}


def measure(run: Callable[[list[list[int]]], None], vocab_size: int, a) -> dict:
    """Batch 1 and the batched throughputs with `run(ids)` decoding exactly a.new_tokens each."""
    batch1 = timed(run, prompt_ids(vocab_size, a.prompt_tokens), a.new_tokens, a.warmup, a.repeats)
    throughput = {}
    for b in (int(x) for x in a.batch_sizes.split(",")):
        if b > 1:
            throughput[str(b)] = timed(run, prompt_ids(vocab_size, a.prompt_tokens, b), a.new_tokens, 1,
                                       max(1, a.repeats // 2))["tokens_per_s"]
    return {"batch1": batch1, "throughput": throughput, "tokens_per_s": batch1["tokens_per_s"]}


def process_tree(pid: int | None = None) -> list[int]:
    """A process and its descendants (Linux /proc; the process alone elsewhere): vLLM's default
    decodes in child processes (engine core, worker), so their memory counts with this one's."""
    pid = pid or os.getpid()
    tree = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    tree += process_tree(int(child))
    except OSError:  # not Linux, or the process is gone
        pass
    return tree


def reset_peak_rss(pids: list[int]) -> bool:
    """Reset each process's peak RSS to its current RSS (Linux: clear_refs "5"); False where
    that is refused, so the caller labels a lifetime peak as one."""
    try:
        for pid in pids:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        return True
    except OSError:
        return False


def status_kib(field: str, pid: int | None = None) -> int | None:
    """A kB field of a process's /proc status (VmRSS, VmHWM); None where there is none (not
    Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def peak_rss(pids: list[int]) -> int:
    """The processes' peak RSS (VmHWM) summed, in bytes; a process that is gone counts 0."""
    return sum((status_kib("VmHWM", pid) or 0) * 1024 for pid in pids)


def check_lengths(got: list[int], new_tokens: int, backend: str) -> None:
    if any(n != new_tokens for n in got):
        raise RuntimeError(f"{backend} decoded {got} tokens, not {new_tokens}")


def write_figures(path: str, figures: dict) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(figures, f)
    os.replace(tmp, path)
