"""Error classes the driver reports as one red line with the fix (SPEC.md section 9)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, nothing written."""

    exit_code = 2


class UnsupportedSetting(UserError):
    """A method's engine cannot run a preset (the upstream code hard-codes what the preset sets):
    bad input for a bench, an `unsupported` cell for a matrix, which goes on with the others."""


class StoreError(UserError):
    """The result store holds something that cannot be trusted (corrupted, partial)."""


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
    if isinstance(exc, NotImplementedError) or name == "UnsupportedModelError":
        return "unsupported"
    if isinstance(exc, (FileNotFoundError, ValueError)):
        return "bad_input"
    return "crash"
