"""Where the upstream code and data come from, and which hub loads are served locally.

The method image holds the upstream checkout at `/opt/llmcbench/upstream/<method>` and its
pinned interpreter at `/opt/llmcbench/upstream-venv/bin/python` (images/Dockerfile.method).
Outside an image (the local runner, a lent GPU machine) `LLMCBENCH_UPSTREAM_DIR` names a
folder with one checkout per method and `LLMCBENCH_UPSTREAM_PYTHON` the interpreter;
without the latter the job's own interpreter runs upstream (recorded in result.json).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from .adapter import StagedData

IMAGE_UPSTREAM = Path("/opt/llmcbench/upstream")
IMAGE_PYTHON = Path("/opt/llmcbench/upstream-venv/bin/python")


class UpstreamUnavailable(FileNotFoundError):
    """No checkout of the upstream repository here: a bad_input failure, said in one line."""


def upstream_repo(method: str) -> Path:
    roots = [Path(p) for p in os.environ.get("LLMCBENCH_UPSTREAM_DIR", "").split(os.pathsep) if p] + [IMAGE_UPSTREAM]
    for root in roots:
        if (root / method).is_dir() and any((root / method).iterdir()):
            return (root / method).resolve()
    raise UpstreamUnavailable(
        f"no upstream checkout of {method} (looked in {', '.join(str(r / method) for r in roots)}): build the method image "
        f"with GitHub access (`llmcbench images build {method}`) or set LLMCBENCH_UPSTREAM_DIR to a folder holding {method}/")


def upstream_python() -> str:
    explicit = os.environ.get("LLMCBENCH_UPSTREAM_PYTHON")
    if explicit:
        return explicit
    return str(IMAGE_PYTHON) if IMAGE_PYTHON.exists() else sys.executable


def upstream_interpreter_id(harness: str = sys.executable) -> str | None:
    """What the job hash adds for an upstream-engine job on the local and Slurm runners when upstream's
    code runs on another interpreter than the jobs' own `harness` (LLMCBENCH_UPSTREAM_PYTHON, which
    sbatch passes on): its library versions, so that pointing it at another venv never serves the old
    venv's cached result. None where upstream runs on the harness's interpreter (already in the
    runner's identity)."""
    python = os.environ.get("LLMCBENCH_UPSTREAM_PYTHON")
    return None if not python or python == harness else _interpreter_id(python)


@functools.lru_cache(maxsize=None)
def _interpreter_id(python: str) -> str:
    from llmcbench.driver.errors import UserError

    from .adapter import SHIM

    try:
        proc = subprocess.run([python, str(SHIM), "--versions"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"LLMCBENCH_UPSTREAM_PYTHON={python} cannot be run: {getattr(e, 'strerror', None) or e}") from None
    try:
        versions = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        versions = None
    if proc.returncode != 0 or not isinstance(versions, dict):
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit code {proc.returncode}"]
        raise UserError(f"LLMCBENCH_UPSTREAM_PYTHON={python} cannot report its versions: {lines[-1]}")
    return ",".join(f"{k}={v}" for k, v in sorted(versions.items()))


def checkout_commit(repo: Path) -> str | None:
    """The commit of the checkout (a git work tree), or what UPSTREAM.json of the image says."""
    marker = repo / ".llmcbench-commit"  # written by the image build next to a checkout without .git
    if marker.is_file():
        return marker.read_text().strip()
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


def stage_data(data_dir: Path, offline: bool) -> StagedData:
    c4 = data_dir / "hf" / "allenai__c4" / "en" / "train.jsonl"
    wikitext = data_dir / "hf" / "Salesforce__wikitext" / "wikitext-2-raw-v1" / "test.jsonl"
    return StagedData(calibration=c4 if c4.is_file() else None, wikitext_test=wikitext if wikitext.is_file() else None,
                      offline=offline)


def dataset_rules(staged: StagedData, *, unused_splits: list[str] = ()) -> list[dict]:
    """The shim's `datasets` rules: which `load_dataset` calls get which staged files.

    Offline, C4 (any config, including the removed `allenai--c4`) is the calibration slice;
    upstream's other calibration corpora (pile-val for AWQ/SmoothQuant, BookCorpus for
    LLM-Pruner) are served the same slice, which the adapter records in the artifact's
    notes. WikiText-2's test split is upstream's own perplexity.

    `unused_splits` ("c4:validation", "wikitext:train") are splits an upstream loader always
    loads but whose content this step never uses (Wanda's `get_c4` returns a validation
    encoding its pruning discards; GPTQ's `get_wikitext2` samples train windows its
    evaluation discards). They are served the dataset's staged file so the loader runs;
    each such load is an event in the step's log. PTB and C4 validation are not staged
    otherwise: upstream's evaluation on them stops the run after the model was saved (shim.py).
    An unused C4 split is served only until the step's model is saved (`until_saved`): the
    same loader called after that is upstream's C4 evaluation (OmniQuant's `--eval_ppl`), which
    must not score the calibration documents as if they were C4 validation.
    """
    if not staged.offline:
        # hub data as upstream uses it; only the config name the hub removed is dropped
        return [{"match": ["allenai/c4"], "configs": ["allenai--c4"], "drop_config": True}]
    unused: dict[str, list[str]] = {}
    for item in unused_splits:
        dataset, _, split = item.partition(":")
        unused.setdefault(dataset, []).append(split)
    rules = []
    if staged.calibration is not None:
        c4 = str(staged.calibration)
        rules += [
            {"match": ["allenai/c4", "c4", "allenai--c4"], "files": {"train": c4, **{s: c4 for s in unused.get("c4", [])}},
             "until_saved": unused.get("c4", [])},
            {"match": ["mit-han-lab/pile-val-backup", "pile-val-backup"], "files": {"validation": c4}},
            {"match": ["bookcorpus", "bookcorpus/bookcorpus"], "files": {"train": c4}},
        ]
    if staged.wikitext_test is not None:
        wt = str(staged.wikitext_test)
        files = {"test": wt, **{s: wt for s in unused.get("wikitext", [])}}
        rules.append({"match": ["wikitext", "Salesforce/wikitext"], "configs": ["wikitext-2-raw-v1"], "files": files})
    return rules


def cut_wikitext_test(source: Path, dest: Path, tokenizer_dir: Path, tokens: int) -> dict:
    """The shortest prefix of the WikiText-2 test rows whose joined text has at least `tokens` tokens.

    Upstream's own perplexity always runs over the whole test split (about 300k tokens: 148
    windows of 2048 for SmolLM2, an hour under the images' CPU torch), while the quick
    profile's own perplexity scores only its first windows. On quick, upstream is served this
    prefix instead: the text our quick figure is computed on, and at least one window of
    upstream's own sequence length, so that its loop (`numel // seqlen` windows) still runs.
    The rows are joined with "\n\n" and tokenized as every upstream script does, with the
    input model's tokenizer (the staged copy tokenizes identically). Returns what was served
    (result.json keeps it next to upstream's figure).
    """
    from functools import cache

    from transformers import AutoTokenizer

    from llmcbench.tracks.performance.perplexity import encode_joined

    rows = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [json.loads(line)["text"] for line in rows]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    @cache
    def count(k: int) -> int:  # tokens of the first k rows, joined and tokenized as our perplexity and upstream's do
        return encode_joined(tokenizer, texts[:k]).numel()

    offsets = tokenizer("\n\n".join(texts), return_offsets_mapping=True)["offset_mapping"]  # the whole split, once
    if len(offsets) <= tokens:
        return {"rows": len(rows), "rows_total": len(rows), "tokens": len(offsets), "tokens_wanted": tokens, "cut": False}
    # the row holding the `tokens`-th token's last character, then as many more as the prefix's own tokenization needs
    end_char, ends, pos = offsets[tokens - 1][1], [], 0
    for text in texts:
        pos += len(text)
        ends.append(pos)
        pos += 2
    k = next(i + 1 for i, e in enumerate(ends) if e >= end_char)
    while k < len(texts) and count(k) < tokens:
        k += 1
    while k > 1 and count(k - 1) >= tokens:
        k -= 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(line + "\n" for line in rows[:k]), encoding="utf-8")
    served = count(k)
    return {"rows": k, "rows_total": len(rows), "tokens": served, "tokens_wanted": tokens, "cut": True}


def stage_model(model_dir: Path, root: Path) -> tuple[Path, list[str]]:
    """The input model as the upstream stacks (transformers 4.31-4.46, tokenizers < 0.20) read it.

    A model saved by transformers >= 5 (the embedded SmolLM2, any model this harness wrote)
    differs from the format those versions read in three files:
    - tokenizer.json stores the BPE merges as pairs, which tokenizers < 0.20 cannot parse
      ("data did not match any variant of untagged enum ModelWrapper");
    - tokenizer_config.json names the class `TokenizersBackend`, unknown to 4.x;
    - config.json nests `rope_theta` in `rope_parameters` and says `dtype`: 4.x reads neither
      and would run a model trained with rope_theta 100000 (SmolLM2) at 10000, silently.
    The copy is `root/<model name>` (the same name: OmniQuant derives its net label from it)
    with those files rewritten and every other file linked, not copied (a 7B model stays
    where it is). A model already in the old format (the hub's LLaMA-2) is used as it is.
    Returns the directory upstream is given and what was rewritten (result.json records it).
    """
    rewritten: dict[str, dict] = {}
    changes: list[str] = []
    for name, rewrite in (("config.json", _legacy_config), ("tokenizer.json", _legacy_tokenizer),
                          ("tokenizer_config.json", _legacy_tokenizer_config)):
        path = model_dir / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        done = rewrite(data)
        if done:
            rewritten[name] = data
            changes += [f"{name}: {c}" for c in done]
    if not rewritten:
        return model_dir, []
    staged = root / model_dir.name
    staged.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name not in rewritten:
            (staged / item.name).symlink_to(item.resolve())
    for name, data in rewritten.items():
        (staged / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return staged, changes


def _legacy_config(config: dict) -> list[str]:
    changes = []
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        changes.append(f"rope_theta {rope['rope_theta']:g} from rope_parameters")
        kind = rope.get("rope_type", "default")
        if kind != "default" and config.get("rope_scaling") is None:
            config["rope_scaling"] = {"type": kind, **{k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}}
            changes.append(f"rope_scaling {kind} from rope_parameters")
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
        changes.append(f"torch_dtype {config['dtype']} from dtype")
    return changes


def _legacy_tokenizer(tokenizer: dict) -> list[str]:
    model = tokenizer.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not isinstance(merges[0], list):
        return []
    if any(" " in part for pair in merges for part in pair):
        return []  # a merge part with a space has no string form; tokenizers < 0.20 cannot read this model at all
    model["merges"] = [" ".join(pair) for pair in merges]
    return [f"{len(merges)} BPE merges as 'a b' strings"]


def _legacy_tokenizer_config(config: dict) -> list[str]:
    if config.get("tokenizer_class") != "TokenizersBackend":
        return []
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return ["tokenizer_class PreTrainedTokenizerFast (was TokenizersBackend)"]
