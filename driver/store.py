"""The result store: `runs/<cell>/<job hash>/`, one directory per job.

A run directory is the job's `/out` plus its `job.json`: `job.json`, `log.txt`,
`model/` (compress jobs, with `compression.json`), and `result.json`, written last. So:
- `result.json` present, sealed and `ok`, outputs matching their recorded hashes: a cache hit;
- `result.json` with `status: failed`: kept with its log until the job is run again;
- no `result.json`: an interrupted job, run again from scratch;
- `result.json` unreadable, edited, or outputs that no longer match: never trusted — an
  error that names the file (`--force` recomputes it).

Several `llmcbench` processes may share a store (two terminals, a matrix beside a bench):
a job is checked, prepared and run under `runs/.locks/<job hash>.lock` (an OS file lock,
released when its process dies), so a job shared by two benches, such as the dense
evaluation, runs once while the other waits for its cached result, and no process wipes
a run dir that another is writing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from filelock import FileLock

from .contract import ContractError, Job, Result, read_record
from .errors import StoreError
from .fsio import sha256_file, write_record

RESULT = "result.json"


def cell_name(method: str, preset: str | None, model_name: str) -> str:
    parts = [method] + ([preset] if preset else []) + [model_name]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts)).lower()


class Store:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def run_dir(self, cell: str, job_hash: str) -> Path:
        return self.root / cell / job_hash

    def cached(self, run_dir: Path) -> Result | None:
        """The trusted ok result of this run dir, or None when the job must (re)run."""
        path = run_dir / RESULT
        if not path.exists():
            return None
        try:
            result = read_record(path, Result)
        except ContractError as e:
            raise StoreError(f"corrupted result in the store: {e}; rerun with --force to recompute it") from None
        if result.job_hash != run_dir.name:
            raise StoreError(f"corrupted result in the store: {path} belongs to job {result.job_hash[:12]}, not {run_dir.name[:12]}; rerun with --force")
        if result.status != "ok":
            return None
        for rel, digest in result.output_sha256.items():
            f = run_dir / rel
            if not f.is_file() or sha256_file(f) != digest:
                raise StoreError(f"corrupted artifact in the store: {f} is missing or does not match its recorded sha256; rerun with --force")
        return result

    def lock(self, run_dir: Path) -> FileLock:
        """The inter-process lock of one job (held while it is checked, prepared and run)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(locks / f"{run_dir.name}.lock")

    def prepare(self, run_dir: Path, job: Job) -> None:
        """Start a fresh run dir holding only job.json (a previous failed/partial attempt is replaced)."""
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        write_record(run_dir / "job.json", job)

    def results(self):
        """Every trusted, readable result in the store, with its job (for cross-method tracks)."""
        for path in sorted(self.root.glob(f"*/*/{RESULT}")):
            try:
                yield read_record(path.parent / "job.json", Job), read_record(path, Result), path.parent
            except ContractError:
                continue
