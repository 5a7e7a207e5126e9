"""Two `llmcbench bench` processes on one store (two terminals, a matrix beside a bench):
each job runs once, and no process wipes a run dir that another is writing.

Before the store's job locks, both processes found the shared dense evaluation uncached,
and the second one's fresh start deleted the first one's run dir while it ran."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from llmcbench.driver.bench import plan_bench, planned_jobs
from llmcbench.driver.contract import Result, read_record
from llmcbench.driver.store import Store


def _bench(tiny_llama_dir, runs):
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "llmcbench.driver.cli", "bench", "-m", "wanda", "--model", str(tiny_llama_dir),
           "--tracks", "3,4", "--device", "cpu", "--runs-dir", str(runs)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _status(stdout: str, key: str) -> str:
    """'done' or 'cached': the final progress line of one job."""
    line = next(l for l in stdout.splitlines() if re.match(rf"\s*{key}:", l))
    return "cached" if "cached" in line else "done" if "done" in line else line


def test_two_benches_on_one_store_run_each_job_once(tmp_path, tiny_llama_dir):
    """This test holds the dense evaluation's lock, as a third process running it would.
    Both benches must compress once between them, then wait at the dense evaluation without
    touching its run dir; once it is released, one runs it and the other finds it cached."""
    runs = tmp_path / "runs"
    jobs = {p.key: p for p in planned_jobs(plan_bench("wanda", model=str(tiny_llama_dir), tracks="3,4", runs_dir=runs,
                                                      device="cpu"))}
    dense, compress = jobs["dense eval"], jobs["compress"]
    held = Store(runs).lock(dense.run_dir)
    held.acquire(timeout=0)
    procs = [_bench(tiny_llama_dir, runs) for _ in range(2)]
    try:
        deadline = time.monotonic() + 300
        while not (compress.run_dir / "result.json").exists():
            assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs if p.poll() is not None]
            assert time.monotonic() < deadline, "the compress job did not finish in 300 s"
            time.sleep(0.2)
        time.sleep(5)  # both are past the compress job (one ran it, one waited for it) and at the lock
        assert all(p.poll() is None for p in procs), "a bench finished although its dense evaluation was locked"
        assert not dense.run_dir.exists(), "a bench prepared the dense evaluation's run dir while another held it"
    finally:
        held.release()
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    for key in ("compress", "dense eval", "compressed eval"):
        assert sorted(_status(o, key) for o in outputs) == ["cached", "done"], (key, [o[-2000:] for o in outputs])
    assert read_record(dense.run_dir / "result.json", Result).status == "ok"
    assert Store(runs).cached(dense.run_dir) is not None
