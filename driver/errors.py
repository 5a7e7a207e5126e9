"""Error classes the driver reports as one red line with the fix (SPEC.md section 9)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, nothing written."""

    exit_code = 2


class UnsupportedSetting(UserError):
    """A method's engine cannot run a preset (the upstream code hard-codes what the preset sets):
    bad input for a bench, an `unsupported` cell for a matrix, which goes on with the others."""


class StoreError(UserError):
    """The result store holds something that cannot be trusted (corrupted, partial), or cannot be
    written. The problem and its fix are kept apart: the fix depends on the command that met it
    (`eval` cannot repair a compress result with its own --force, so it names `compress --force`)."""

    def __init__(self, problem: str, fix: str = "rerun with --force to recompute it"):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix

    def with_fix(self, fix: str) -> "StoreError":
        return StoreError(self.problem, fix)

    def __reduce__(self):  # pickled as its two parts, not rebuilt from the joined text (the fix twice)
        return StoreError, (self.problem, self.fix)


class JobFailed(Exception):
    """A job ran and failed; its log and `result.json` (status failed) are kept."""

    exit_code = 1

    def __init__(self, message: str, run_dir=None, error_type: str = "crash"):
        super().__init__(message)
        self.run_dir = run_dir
        self.error_type = error_type


# How an allocation failure reads where it is no MemoryError: CUDA's caching allocator, torch's
# CPU allocator ("[enforce fail at alloc_cpu.cpp] ... DefaultCPUAllocator: can't allocate memory:
# you tried to allocate N bytes. Error code 12 (Cannot allocate memory)": a RuntimeError, which
# was classified as a crash), cuBLAS's workspace.
OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "defaultcpuallocator",
                "cublas_status_alloc_failed")


# How a full disk reads: OSError ENOSPC/EDQUOT in Python's words, safetensors' Rust I/O error
# ("Error while serializing: I/O error: No space left on device (os error 28)"), torch.save's
# zip writer ("PytorchStreamWriter failed writing file ...: file write failed").
DISK_MESSAGES = ("no space left on device", "disk quota exceeded", "os error 28", "file write failed")


def is_out_of_disk(exc: BaseException | str) -> bool:
    """An error that means the disk being written is full (SPEC.md section 9: reported as such)."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(sign in str(exc).lower() for sign in DISK_MESSAGES)


def out_of_disk_hint(path=None) -> str:
    """The fix, with the free space where the write failed (when that is known)."""
    import shutil
    from pathlib import Path

    if path is None:
        return "out of disk: free space where the store is, or pass --runs-dir on a larger disk, and run the same command again"
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
        free = f"{free / 1e9:.1f} GB" if free >= 1e8 else f"{free / 1e6:.1f} MB"
        free += f" free at {where}"
    except OSError:
        free = f"the disk of {where}"
    return f"out of disk ({free}): free space there, or pass --runs-dir on a larger disk, and run the same command again"


def classify_exception(exc: BaseException) -> str:
    """Map an exception raised inside a job to the contract's error class."""
    import builtins

    declared = getattr(exc, "error_type", None)  # e.g. the upstream engine's failures say their class
    if isinstance(declared, str):
        return declared
    name = type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, builtins.MemoryError) or name in {"OutOfMemoryError", "OOMError"}:
        return "oom"
    if any(sign in str(exc).lower() for sign in OOM_MESSAGES):
        return "oom"
    if is_out_of_disk(exc):
        return "out_of_disk"
    if isinstance(exc, NotImplementedError) or name == "UnsupportedModelError":
        return "unsupported"
    if isinstance(exc, (FileNotFoundError, ValueError)):
        return "bad_input"
    return "crash"
