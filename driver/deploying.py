"""`llmcbench deploy`: track 5 for a few artifacts, with the dense model measured in the same run.

Each `method[:preset]` is a bench of track 5 only: its compress job comes from the store when
it is there; its deploy jobs (dense and compressed, on the chosen backend) are measured again
in this run, because a speedup compares timings taken under the same conditions. The table
shows batch-1 decode tokens/s, batched throughput, peak memory and the speedup over dense.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .bench import plan_bench, planned_jobs, run_bench
from .errors import UserError


@dataclass
class DeployRow:
    label: str
    backend: str
    category: str
    kernel: str
    tokens_per_s: float
    throughput: dict
    peak_memory_gb: float
    memory_kind: str
    speedup: float | None
    notes: list[str]
    source: str


def run_deploy(cells: list[str], backends: list[str] | str, model: str | None, profile: str, runner: str, device: str,
               runs_dir: Path, data_dir: str | None, on_start: Callable[[str], None] | None = None,
               compile: bool = False, trust_remote_code: bool = False) -> list[DeployRow]:
    """Dense and every cell on every backend; each speedup is against dense on the same backend, in this run."""
    backends = [backends] if isinstance(backends, str) else list(backends)
    if not cells:
        raise UserError("no cells: pass --cells wanda,gptq:w4a16-g128")
    if not backends:
        raise UserError("no backend: pass --backend torch_native (or a comma-separated list)")
    plans = []
    for cell in cells:
        method, _, preset = cell.partition(":")
        plans.append(plan_bench(method, preset or None, model, [5], profile, "reference", runner, runs_dir, data_dir, device,
                                backends=backends, compile=compile, trust_remote_code=trust_remote_code))
    backends = plans[0].backends  # as plan_bench spells them (TensorRT-LLM: tensorrt_llm)
    remeasured: set[Path] = set()
    for plan in plans:  # timings of this run only: the deploy jobs run again
        for p in planned_jobs(plan):
            if p.job.kind == "deploy" and p.run_dir not in remeasured:
                remeasured.add(p.run_dir)
                shutil.rmtree(p.run_dir, ignore_errors=True)
    rows: list[DeployRow] = []
    dense: dict[str, DeployRow] = {}
    for plan in plans:
        if on_start:
            on_start(f"{plan.method.name} {plan.preset} on {plan.model.name}: compress (or cached), deploy on {', '.join(backends)}")
        run_bench(plan)
        for backend in backends:
            if backend not in dense:
                dense[backend] = _row("dense", backend, plan.runs[f"dense deploy {backend}"], None)
                rows.append(dense[backend])
            rows.append(_row(f"{plan.method.name} {plan.preset}", backend, plan.runs[f"compressed deploy {backend}"],
                             dense[backend].tokens_per_s))
    order = {b: i for i, b in enumerate(backends)}
    return sorted(rows, key=lambda r: order[r.backend])  # stable: dense first within each backend


def _row(label: str, backend: str, run, dense_tokens_per_s: float | None) -> DeployRow:
    t5 = run.result.metrics["track5"]
    kernel = t5["kernel"] + (", compiled" if t5.get("compiled") else "")
    return DeployRow(label, backend, t5["category"], kernel, t5["tokens_per_s"], t5["throughput"], t5["peak_memory_bytes"] / 1e9,
                     t5["memory_kind"], t5["tokens_per_s"] / dense_tokens_per_s if dense_tokens_per_s else None, t5["notes"],
                     str(run.run_dir / "result.json"))


# what each backend's peak memory figure is (tracks/acceleration: protocol.py, the measure scripts)
MEMORY_KINDS = {
    "gpu_reserved": "torch's peak reserved GPU memory during the timed runs",
    "host_rss": "the process's peak RSS during the timed runs",
    "host_rss_processes": "the peak RSS of the process running vLLM (and of any engine processes it started, summed) during the timed runs, its KV cache allocated up front included",
    "host_rss_processes_lifetime": "the lifetime peak RSS of the process running vLLM (and of any engine processes it started, summed), the load included",
    "host_rss_max_process": "the process's lifetime peak RSS (the load included)",
    "gpu_used_after_runs": "GPU memory in use after the timed runs (every process on the GPU)",
}


def deploy_table(rows: list[DeployRow]):
    from rich.table import Table

    kinds = dict.fromkeys((r.backend, r.memory_kind) for r in rows)  # in row order, each once
    t = Table(title="Track 5: batch-1 greedy decode (median), measured in this run; speedup against dense on the same backend",
              caption="peak memory, " + "; ".join(f"{b}: {MEMORY_KINDS.get(k, k)}" for b, k in kinds))
    for col in ("backend", "model", "category", "kernel", "tokens/s", "throughput (batch: tokens/s)", "peak memory (GB)", "speedup", "notes"):
        t.add_column(col, justify="right" if col in ("tokens/s", "peak memory (GB)", "speedup") else "left")
    for r in rows:
        t.add_row(r.backend, r.label, r.category, r.kernel, f"{r.tokens_per_s:.1f}",
                  ", ".join(f"{b}: {v:.1f}" for b, v in r.throughput.items()) or "-",
                  f"{r.peak_memory_gb:.2f} ({'GPU' if r.memory_kind.startswith('gpu') else 'RSS'})",
                  "1.00 (baseline)" if r.speedup is None else f"{r.speedup:.2f}x", "; ".join(r.notes))
    return t
