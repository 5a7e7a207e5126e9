"""Fill `.device/`, the one folder a lent GPU machine needs besides the working tree.

The lent machine (the `device` tool: one NVIDIA H200, Python 3.12, torch, transformers,
accelerate, peft, typer, rich and pytest preinstalled) has no package index and no
internet, and a call carries at most 64 MiB (working tree + carried paths). Its GPU time is
short (15 minutes a session, machine start included), so everything it needs is prepared
here, where the registries are, and `benchmarks/device_check.sh` runs there in one go.

    .device/whl/        cp312 wheels of what the harness imports and that machine lacks
    .device/upwhl/      the upstream engines' stacks (older transformers and friends): common/ plus one
                        folder per transformers version, stacks.txt says which method runs on which;
                        installed apart and put first on the path of LLMCBENCH_UPSTREAM_PYTHON only
    .device/upstream/<method>/   each upstream repository at its pinned commit (code, no
                        assets), with `.llmcbench-commit` as the method image writes it
    .device/data/       the data slices (../shared/data does not travel with the tree)
    .device/tokenizer/  a LLaMA-2-style sentencepiece tokenizer trained on the slices: device_check.sh
                        builds its random-weights LLaMA with it (the 93 MB embedded model does not fit)

    python benchmarks/device_prepare.py --upstream-git '/work/.mirror/{owner}+{name}/repo'   # local mirrors
    python benchmarks/device_prepare.py --no-upstream        # harness checks only
    python benchmarks/device_prepare.py --rehearsal /tmp/rehearsal   # + the same wheels for this Python

A rehearsal runs the device check here without a GPU, on this machine's Python, to find
wiring faults before they cost device minutes (the upstream repositories run on CPU through
the shim):

    WHL=/tmp/rehearsal/whl UPWHL=/tmp/rehearsal/upwhl DEVICE=cpu PYTHON=<venv>/bin/python \
        bash benchmarks/device_check.sh tests cost upstream

Without `--upstream-git` each repository is cloned from its URL (needs GitHub). Files a
mirror lists but does not hold (its largest blobs) and files over 2 MiB are left out and
counted: upstream's code is small, its figures and PDFs are not needed to run it.
`.device/` is git-ignored, so it travels only when a device call names it in `carry`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICE_DIR = ROOT / ".device"
CARRY_LIMIT = 64 * 2**20
MAX_FILE = 2 * 2**20
ASSETS = {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".mp4", ".svg", ".pt", ".bin", ".safetensors", ".ipynb"}
METHODS = ("wanda", "sparsegpt", "gptq", "awq", "smoothquant", "omniquant", "llm_pruner")

# What the harness imports that the lent machine's image lacks (read off its package list:
# /work/.library/device/KINDS.md), at the versions CI runs with.
HARNESS_WHEELS = [
    "pydantic==2.13.4", "pydantic-core==2.46.4", "annotated-types==0.7.0", "typing-inspection==0.4.2",
    "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
]
# The upstream repositories on that machine (no Docker there, so not the method images' stacks:
# their older torch/CUDA cannot be installed there). Python 3.12 and its torch are given; each
# repository gets the transformers nearest its own pin that has wheels for them:
#   tf436  transformers 4.36.2: the last release whose LLaMA layers still work with the calls every
#          upstream layer-by-layer loop makes (no `position_embeddings`; GPTQ passes no position_ids,
#          which 4.36's rotary broadcasts and 4.38 rejects); SmoothQuant needs >= 4.36 (its Mixtral
#          import), OmniQuant pins 4.36.2, Wanda 4.34, GPTQ/SparseGPT 4.35, LLM-Pruner >= 4.28.
#   tf446  transformers 4.46.3 for llm-awq, which pins 4.46.0 (4.46.0 is yanked).
UPSTREAM_STACKS = {
    "tf436": ["transformers==4.36.2", "tokenizers==0.15.2"],
    "tf446": ["transformers==4.46.3", "tokenizers==0.20.3"],
}
STACK_OF = {"awq": "tf446"}  # the rest: tf436
UPSTREAM_COMMON = [
    "huggingface-hub==0.26.5", "accelerate==0.34.2", "datasets==2.21.0", "dill==0.3.8", "multiprocess==0.70.16",
    "fsspec==2024.6.1",
    # llm-awq's entry imports these at module level, and lm_eval 0.3.0's `tasks` what follows it
    "texttable==1.7.0", "toml==0.10.2", "attributedict==0.3.0", "lm_eval==0.3.0", "pycountry==26.2.16", "nltk==3.10.4",
    # OmniQuant's utils.py and its vendored lm_eval
    "termcolor==3.3.0", "omegaconf==2.3.0",
]
# Left out of the checkouts: what the runs never import (LLM-Pruner's vendored copy of an old
# lm-evaluation-harness, 8.7 MiB, is only for its own evaluation scripts).
EXCLUDE = {"llm_pruner": ("lm-evaluation-harness/",)}
# Pure-Python packages PyPI has only as source: built into wheels here (`pip wheel`).
UPSTREAM_BUILT = ["sqlitedict==2.1.0", "rouge-score==0.1.2", "antlr4-python3-runtime==4.9.3"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def log(msg: str) -> None:
    print(msg, flush=True)


def download_wheels(requirements: list[str], dest: Path, built: list[str] = (), python: str = "3.12") -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if built:
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), *built],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: pip wheel failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: pip download failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
    log(f"{shown} (cp{python.replace('.', '')}): {len(list(dest.glob('*.whl')))} wheels, {_size(dest) / 2**20:.1f} MiB")


def _git(repo: Path, *args: str, binary: bool = False):
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=not binary)
    return proc


def export_upstream(method: str, template: str | None, dest_root: Path) -> None:
    spec = tomllib.loads((ROOT / "methods" / method / "method.toml").read_text())["upstream"]
    url, commit = spec["repo"], spec["commit"]
    owner, name = url.rstrip("/").removesuffix(".git").split("/")[-2:]
    with tempfile.TemporaryDirectory() as tmp:
        if template:
            repo = Path(template.format(owner=owner, name=name))
        else:
            repo = Path(tmp) / "clone"
            proc = subprocess.run(["git", "clone", "--quiet", "--no-checkout", url, str(repo)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"error: git clone {url} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        listing = _git(repo, "ls-tree", "-r", "-l", commit)
        if listing.returncode != 0:
            raise SystemExit(f"error: {repo} has no commit {commit[:12]} of {url}")
        dest = dest_root / method
        shutil.rmtree(dest, ignore_errors=True)
        kept = skipped = missing = 0
        for line in listing.stdout.splitlines():
            meta, path = line.split("\t", 1)
            mode, kind, sha, size = meta.split()
            if kind != "blob" or mode == "120000":
                continue
            if not size.isdigit():  # listed, but the source does not hold the blob
                missing += 1
                continue
            if int(size) > MAX_FILE or Path(path).suffix.lower() in ASSETS or path.startswith(EXCLUDE.get(method, ())):
                skipped += 1
                continue
            blob = _git(repo, "cat-file", "blob", sha, binary=True)
            if blob.returncode != 0:
                missing += 1
                continue
            out = dest / path
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(blob.stdout)
            if mode == "100755":
                out.chmod(0o755)
            kept += 1
    for rel in spec.get("image", {}).get("patches", []):
        patch = ROOT / "methods" / method / rel
        # the ceiling keeps git from taking this repository for the checkout's (it would skip the paths)
        proc = subprocess.run(["git", "apply", str(patch)], cwd=dest, capture_output=True, text=True,
                              env={**os.environ, "GIT_CEILING_DIRECTORIES": str(dest.parent)})
        if proc.returncode != 0:
            raise SystemExit(f"error: {patch} does not apply to {url} at {commit[:12]}: {proc.stderr.strip()[-200:]}")
        log(f"upstream/{method}: applied {rel}")
    (dest / ".llmcbench-commit").write_text(commit + "\n")
    log(f"upstream/{method}: {url} at {commit[:12]}: {kept} files, {skipped} assets or >2 MiB left out, "
        f"{missing} not held by the source, {_size(dest) / 2**10:.0f} KiB")


def train_tokenizer(dest: Path, data: Path) -> None:
    """A LLaMA-2-style sentencepiece tokenizer (BPE, 32000 pieces, byte fallback, split digits)
    trained on the WikiText-2 and C4 slices, in under a second.

    The random-weights models device_check.sh builds need a tokenizer that every upstream
    repository loads: LLM-Pruner and GPTQ call `LlamaTokenizer` (sentencepiece) directly, and
    the embedded model's byte-level BPE is not one (nor does its 93 MB wheel fit the carry)."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise SystemExit("error: training the device tokenizer needs sentencepiece: pip install sentencepiece")
    lines = (data / "wikitext2" / "wiki.test.raw").read_text().splitlines()
    lines += [json.loads(line)["text"] for line in (data / "c4" / "c4_en_train_shard00000_first256.jsonl").read_text().splitlines()]
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in lines if line.strip()]), model_prefix=str(dest / "tokenizer"),
        vocab_size=32000, model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=0.99995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", minloglevel=2, num_threads=2)
    (dest / "tokenizer.vocab").unlink()
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True, "add_eos_token": False,
        "legacy": False, "model_max_length": 4096, "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    log(f"tokenizer: sentencepiece BPE, 32000 pieces, {(dest / 'tokenizer.model').stat().st_size / 2**10:.0f} KiB")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def tree_size() -> int:
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())


def download_all_wheels(dest: Path, python: str, methods: list[str], upstream: bool) -> None:
    """The harness's wheels in dest/whl, and with `upstream` each stack's in dest/upwhl, for `python`."""
    download_wheels(HARNESS_WHEELS, dest / "whl", python=python)
    shutil.rmtree(dest / "upwhl", ignore_errors=True)
    if upstream:
        download_wheels(UPSTREAM_COMMON, dest / "upwhl" / "common", UPSTREAM_BUILT, python=python)
        for stack, requirements in UPSTREAM_STACKS.items():
            download_wheels(requirements, dest / "upwhl" / stack, python=python)
        (dest / "upwhl" / "stacks.txt").write_text("".join(f"{m} {STACK_OF.get(m, 'tf436')}\n" for m in methods))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream-git", default=None, help="git dir per repository, with {owner} and {name} (default: clone)")
    ap.add_argument("--no-upstream", action="store_true", help="leave out the upstream checkouts and their stack")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rehearsal", type=Path, default=None,
                    help="also put the same wheels for this machine's Python in DIR/whl and DIR/upwhl (a CPU rehearsal)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the data slices (default ../shared/data)")
    args = ap.parse_args(argv)
    if not (args.data / "MANIFEST.md").is_file():
        raise SystemExit(f"error: {args.data} is not the data slices folder (no MANIFEST.md)")
    DEVICE_DIR.mkdir(exist_ok=True)
    methods = args.methods.split(",")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    targets = [(DEVICE_DIR, "3.12")] + ([(args.rehearsal.resolve(), here)] if args.rehearsal else [])
    for dest, python in targets:
        download_all_wheels(dest, python, methods, upstream=not args.no_upstream)
    shutil.rmtree(DEVICE_DIR / "upstream", ignore_errors=True)
    if not args.no_upstream:
        for method in methods:
            export_upstream(method, args.upstream_git, DEVICE_DIR / "upstream")
    shutil.rmtree(DEVICE_DIR / "data", ignore_errors=True)
    # what the runs read: calibration (C4) and WikiText-2, in the hub layout and the raw files
    for rel in ("MANIFEST.md", "hf/allenai__c4", "hf/Salesforce__wikitext", "c4", "wikitext2"):
        src, dst = args.data / rel, DEVICE_DIR / "data" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    train_tokenizer(DEVICE_DIR / "tokenizer", args.data)
    tree, carried = tree_size(), _size(DEVICE_DIR)
    log(f"working tree {tree / 2**20:.1f} MiB + .device {carried / 2**20:.1f} MiB = {(tree + carried) / 2**20:.1f} MiB "
        f"of {CARRY_LIMIT / 2**20:.0f} MiB")
    if tree + carried > CARRY_LIMIT:
        raise SystemExit("error: over the device tool's carry limit: leave out the upstream checkouts (--no-upstream) or some methods")
    log("next: device run with carry ['.device'] and command `bash benchmarks/device_check.sh`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
