"""Atomic writes and content hashes.

Every file the harness writes goes through `write_atomic` (temp file in the same
directory + fsync + rename), so a crash leaves either the old file or the new one,
never half of one. Hashes are sha256 of file contents.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel

_CHUNK = 1 << 20


def not_there(path: Path, kind: str = "directory") -> str | None:
    """Why `path` is not the existing file or directory (`kind`) a command reads, in the words of
    its error ("does not exist", "is not a directory"); None when it is one."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if (path.is_dir() if kind == "directory" else path.is_file()):
        return None
    return f"is not a {kind}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's 0600 hid a shared store's results from its group


def write_atomic(path: Path, data: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write() names no file: a full disk's error should say which
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(path: Path, record: BaseModel) -> None:
    write_atomic(path, record.model_dump_json(indent=2) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: Path) -> dict[str, str]:
    """sha256 of every regular file under `root`, keyed by its posix path relative to root."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def tree_digest(hashes: dict[str, str]) -> str:
    """One digest for a whole tree: sha256 over sorted `path:hash` lines."""
    lines = "".join(f"{k}:{v}\n" for k, v in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def dir_size_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def user_path(text: str | os.PathLike, what: str) -> Path:
    """A path the user typed, `~` expanded. `~nosuchuser/x` is bad input (pathlib raises a
    RuntimeError, which was a traceback)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        from .errors import UserError

        raise UserError(f"{what} {text}: '{str(text).split(os.sep)[0]}' names no user's home folder") from None


def cache_dir() -> Path:
    """The harness's cache (the embedded model, hashes): $LLMCBENCH_CACHE, else ~/.cache/llmcbench.
    Set but empty counts as unset: Path("") is the current folder, which got 0.5 GB of model."""
    return user_path(os.environ.get("LLMCBENCH_CACHE") or Path.home() / ".cache" / "llmcbench", "LLMCBENCH_CACHE")


def file_in_the_way(path: Path) -> Path | None:
    """The file among `path`'s existing parents, if one is: then nothing can be created there."""
    above = next((p for p in Path(path).absolute().parents if p.exists()), None)
    return above if above is not None and not above.is_dir() else None
