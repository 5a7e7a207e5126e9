"""Resolving `--model` into a `ModelRef`: the embedded default, a local HF dir, or a hub id.

Local dirs are identified by the sha256 of their files, cached by (path, size, mtime) so
a 500 MB checkpoint is hashed once, not on every run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .contract import ModelRef
from .embedded_model import EMBEDDED_NAME, EmbeddedModelError, cache_root, embedded_model_dir
from .errors import UserError
from .fsio import sha256_file, tree_digest, user_path, write_atomic

EMBEDDED_ALIASES = {"", "embedded", "default", EMBEDDED_NAME}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str | None, revision: str | None = None, trust_remote_code: bool = False) -> ModelRef:
    """A registry name, a local HF dir, a hub id, or nothing (the embedded default)."""
    from .model_registry import check_access, lookup

    spec = (spec or "").strip()
    entry = lookup(spec) if spec not in EMBEDDED_ALIASES else None
    if entry is not None and entry.embedded:
        spec = ""
    if spec in EMBEDDED_ALIASES:
        try:
            path = embedded_model_dir()
        except EmbeddedModelError as e:
            raise UserError(str(e)) from None
        return ModelRef(name=EMBEDDED_NAME, source="embedded", identity=f"sha256:{local_dir_digest(path)}", path=str(path))
    if entry is not None:
        check_access(entry, trust_remote_code)
        ref = _resolve_hub(entry.hub_id, revision or entry.revision or None, code=entry.trust_remote_code)
        return ref.model_copy(update={"name": entry.name, "trust_remote_code": entry.trust_remote_code})
    path = user_path(spec, "model")
    looks_like_path = spec.startswith((".", "/", "~")) or path.exists() or not _HUB_ID.match(spec)
    if looks_like_path:
        if not path.exists():
            if not spec.startswith((".", "/", "~")) and "/" not in spec:
                raise UserError(f"unknown model '{spec}': not in the registry (`llmcbench models list`), "
                                "not a local HF dir, not a hub id (org/name)")
            raise UserError(f"model path {spec} does not exist: pass an HF model dir, a hub id, or nothing for the embedded default")
        if not path.is_dir():
            raise UserError(f"model path {spec} is not a directory: pass an HF model dir (with config.json)")
        if not (path / "config.json").is_file():
            raise UserError(f"model dir {spec} has no config.json: it is not a Hugging Face model dir")
        if _needs_remote_code(path, spec) and not trust_remote_code:
            raise UserError(f"model dir {spec} runs its own modelling code (auto_map in its config.json): "
                            "pass --trust-remote-code to allow it (off by default)")
        path = path.resolve()
        return ModelRef(name=_safe_name(path.name), source="local", identity=f"sha256:{local_dir_digest(path)}", path=str(path),
                        trust_remote_code=trust_remote_code)
    return _resolve_hub(spec, revision, code=trust_remote_code).model_copy(update={"trust_remote_code": trust_remote_code})


def _resolve_hub(repo_id: str, revision: str | None, code: bool = False) -> ModelRef:
    """Download (or find in the HF cache) a hub model; the revision is pinned to a commit. `code`:
    the model runs its own modelling code (trust_remote_code, opted in): its *.py files too,
    without which even the opted-in load fails ("does not appear to have a file named
    configuration_chatglm.py")."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        patterns = download_patterns(_repo_files(repo_id, revision), code)
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise UserError(f"model {repo_id} is gated: accept its licence on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"model {repo_id} not found on the hub (and no local dir of that name)") from None
    except Exception as e:  # offline, network
        raise UserError(f"model {repo_id} is not available offline and the hub cannot be reached ({type(e).__name__}): pass a local model dir") from None
    commit = path.name
    return ModelRef(name=_safe_name(repo_id.split("/")[-1]), source="hub", identity=f"hub:{repo_id}@{commit}", path=str(path), revision=commit)


def download_patterns(files: list[str] | None, code: bool = False) -> list[str]:
    """What to fetch of a hub repo: config, tokenizer and the weights in one format, the
    safetensors where the repo has any, else its pickled pytorch_model*.bin (the paper's OPT and
    ChatGLM2 revisions publish no safetensors: fetching *.safetensors alone got no weights at
    all). `files`: the repo's file list, None where it cannot be listed (offline: the cached
    snapshot is what there is). `code`: the model's own *.py (trust_remote_code, opted in)."""
    patterns = ["*.json", "*.model", "*.txt", "*.jinja"] + (["*.py"] if code else [])
    if files is not None and not any(f.endswith(".safetensors") for f in files):
        return patterns + ["pytorch_model*.bin"]
    return patterns + ["*.safetensors"]


def _repo_files(repo_id: str, revision: str | None) -> list[str] | None:
    if not hub_reachable():  # offline: no list to wait for, the cached snapshot is what there is
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().list_repo_files(repo_id, revision=revision)
    except Exception:  # noqa: BLE001 - offline, gated (the download says so), or a hub error: decide without the list
        return None


def _needs_remote_code(path: Path, spec: str) -> bool:
    """A model whose config maps its classes to its own code (ChatGLM's auto_map): loading it
    needs trust_remote_code; without the opt-in the job started and failed in transformers.
    A config.json that is not a JSON object is refused here too, not in the job's log."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"model dir {spec}: config.json cannot be read as JSON ({e}): it is not a Hugging Face model dir") from None
    if not isinstance(config, dict):
        raise UserError(f"model dir {spec}: config.json is not a JSON object: it is not a Hugging Face model dir")
    return bool(config.get("auto_map"))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "model"


def local_dir_digest(path: Path) -> str:
    """Content digest of a model dir; per-file hashes cached by (path, size, mtime_ns)."""
    cache_file = cache_root() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hashes, dirty = {}, False
    for p in sorted(Path(path).rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = sha256_file(p)
            dirty = True
        hashes[p.relative_to(path).as_posix()] = cache[key]
    if dirty:
        try:
            write_atomic(cache_file, json.dumps(cache, indent=0))
        except OSError:  # a read-only cache: the next digest hashes the files again, nothing worse
            pass
    return tree_digest(hashes)


def hub_online() -> bool:
    """Whether the HF hub may be used: not when the user (or CI) set the offline flags."""
    return not any(os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "LLMCBENCH_OFFLINE"))


_ONLINE: bool | None = None


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Online means: no offline flag set and the hub answers a TCP connect within `timeout_s`."""
    global _ONLINE
    if not hub_online():
        return False
    if _ONLINE is None:
        import socket

        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
            _ONLINE = True
        except OSError:
            _ONLINE = False
    return _ONLINE
