"""Benchmark (not a test): the docker runner's overhead on one compress job, against local.

    python benchmarks/runner_overhead.py [--model DIR] [--repeats 2]

Runs the same Wanda compress job (quick profile, the embedded model by default) through
the local and the docker runner, alternating, each time in a fresh store (no cache hit),
and prints the median wall time per runner as the driver sees it (process or container
start to result), the job's own compression-step time, and the ratios docker/local. Image
builds are excluded: build them first (`llmcbench images build wanda`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    from llmcbench.driver.bench import compress_job, plan_bench
    from llmcbench.driver.runners import get_runner
    from llmcbench.driver.store import Store

    runners = {name: get_runner(name) for name in ("local", "docker")}
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runners}
    for i in range(a.repeats):
        for name, runner in runners.items():
            with tempfile.TemporaryDirectory(prefix="llmcbench-overhead-") as tmp:
                plan = plan_bench(a.method, model=a.model, tracks=[3], runner=name, runs_dir=tmp, device="cpu")
                job = compress_job(plan)
                h = job.job_hash(runner.environment_id(job))
                store = Store(Path(tmp))
                run_dir = store.run_dir(plan.cell, h)
                store.prepare(run_dir, job)
                with store.lock(run_dir):  # as a bench holds it: `images prune` leaves a locked job's container
                    t0 = time.perf_counter()
                    result = runner.run(job, h, run_dir, Path(plan.model.path), plan.data_dir)
                    wall = time.perf_counter() - t0
                if result.status != "ok":
                    raise SystemExit(f"{name} run failed: {result.error.type}: {result.error.message}")
                figures[name].append((wall, result.wall_s, result.compress_s))
                print(f"run {i + 1} {name:6s}: driver wall {wall:7.2f} s, job wall {result.wall_s:7.2f} s, "
                      f"compression step {result.compress_s:7.2f} s", flush=True)
    med = {n: [statistics.median(x[k] for x in f) for k in range(3)] for n, f in figures.items()}
    print(f"\nmedian over {a.repeats} runs     local      docker     docker/local")
    for k, label in enumerate(("driver wall (s)", "job wall (s)", "compression step (s)")):
        print(f"{label:24s} {med['local'][k]:8.2f}   {med['docker'][k]:8.2f}   {med['docker'][k] / med['local'][k]:8.3f}")
    print(f"container overhead (driver wall - job wall): docker {med['docker'][0] - med['docker'][1]:.2f} s, "
          f"local {med['local'][0] - med['local'][1]:.2f} s")


if __name__ == "__main__":
    main()
