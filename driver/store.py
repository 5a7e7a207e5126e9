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

import errno
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from filelock import FileLock

from .contract import ContractError, Job, Result, read_record
from .errors import StoreError
from .fsio import sha256_file, write_record
from .judging import judgement_problem

RESULT = "result.json"
# Outputs up to this size are re-hashed whenever the store is read as results (the records, a
# small model's weights); larger ones (a 7B model's weights) are only checked to be there, as
# re-hashing them on every report would take minutes. A cache check and `bundle` re-hash all.
REHASH_BYTES = 64 << 20


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
            raise StoreError(f"corrupted result in the store: {e}") from None
        if result.job_hash != run_dir.name:
            raise StoreError(f"corrupted result in the store: {path} belongs to job {result.job_hash[:12]}, not {run_dir.name[:12]}")
        if result.status != "ok":
            return None
        stale = stale_output(run_dir, result)
        if stale:
            raise StoreError(f"corrupted artifact in the store: {run_dir / stale[0]} is missing or does not match its recorded sha256")
        return result

    def lock(self, run_dir: Path) -> FileLock:
        """The inter-process lock of one job (held while it is checked, prepared and run)."""
        locks = self.root / ".locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # another user's store, a read-only mount: one line, not a traceback
            if e.errno == errno.ENOSPC:
                raise  # the CLI's out-of-disk line, with its hint
            raise StoreError(f"the result store {self.root} cannot be written ({e.strerror})",
                             "pass --runs-dir on a disk you can write to") from None
        return FileLock(locks / f"{run_dir.name}.lock")

    def prepare(self, run_dir: Path, job: Job) -> None:
        """Start a fresh run dir holding only job.json (a previous failed/partial attempt is replaced)."""
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        write_record(run_dir / "job.json", job)

    def results(self):
        """Every trusted, readable result in the store, with its job (for cross-method tracks):
        trusted as the store report trusts a run (`run_problem`), so a bench's track-3 peers
        are never a run its report would reject."""
        for path in sorted(self.root.glob(f"*/*/{RESULT}")):
            try:
                job, result = read_record(path.parent / "job.json", Job), read_record(path, Result)
            except ContractError:
                continue
            if run_problem(path.parent, result) is None:
                yield job, result, path.parent


def run_problem(run_dir: Path, result: Result, rehash_bytes: int | None = REHASH_BYTES,
                listed: Mapping[str, str] | None = None) -> str | None:
    """Why a run dir whose job.json and sealed result.json both validate is still not to be
    trusted, or None. A seal only says the result is intact, not that it is this dir's: the
    result must belong to the dir (`job_hash`), the job file must be the one it hashed, its
    outputs must be there and unchanged (`stale_output`), and a track-7 judgement beside it
    must be sealed and of this job. The one check of every reader of the store as results
    (the store report, `bundle`, a bench's track-3 peers)."""
    if result.job_hash != run_dir.name:
        return f"result.json belongs to job {result.job_hash[:12]}, not to this run dir"
    recorded = result.input_sha256.get("job.json")
    if recorded and sha256_file(run_dir / "job.json") != recorded:
        return "job.json does not match the sha256 its result.json recorded"
    stale = stale_output(run_dir, result, rehash_bytes, listed)
    if stale:
        rel, why = stale
        return f"{rel} {why}"
    return judgement_problem(run_dir, result.job_hash)


def stale_output(run_dir: Path, result: Result, rehash_bytes: int | None = None,
                 listed: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The first output the result recorded (`output_sha256`) that is missing or whose content
    no longer matches its sha256, as (path in the run dir, why); None when all hold. Outputs
    over `rehash_bytes` are only checked to be there (None: all are re-hashed). `listed`: the
    outputs kept elsewhere with their sha256 (a bundle's artifacts.json lists the weights it
    does not carry), which may be absent."""
    for rel, digest in sorted(result.output_sha256.items()):
        f = run_dir / rel
        if not f.is_file():
            if (listed or {}).get(rel) != digest:
                return rel, "is missing: its result.json records it as an output"
        elif (rehash_bytes is None or f.stat().st_size <= rehash_bytes) and sha256_file(f) != digest:
            return rel, "does not match the sha256 its result.json recorded"
    return None
