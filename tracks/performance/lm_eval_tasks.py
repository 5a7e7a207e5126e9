"""Track 1 accuracy through lm-eval's Python API, on an already-loaded model.

Task definitions are the stock ones of the installed (pinned) lm-eval: each stock YAML is
read with lm-eval's own YAML loader (`lm_eval.tasks._yaml_loader.load_yaml`, the function
`TaskManager` itself uses: it resolves `include:` and `!function`), and the resulting
dict is passed to `simple_evaluate` as an inline task config. Offline (`data_dir` given)
only the data source is changed:

- `dataset_path: json`, `dataset_name: None`,
  `dataset_kwargs: {data_files: {<split>: <abs path of the slice>}}`;
- split keys of the stock config that name a split the slice does not ship (e.g. ARC's
  `training_split: train` and `validation_split: validation`) are set to None, because
  lm-eval builds its fewshot pool from the training split at task construction and the
  json builder has no such split. The evaluated split is unchanged;
- MMLU only: the slice holds several subjects in one file, so each stock per-subject task
  gets a `process_docs` that keeps its subject's rows (composed before any stock
  `process_docs`; the stock MMLU YAMLs have none). Fewshot docs (dev) are filtered the
  same way, since lm-eval's fewshot config inherits `process_docs`.

Online (`data_dir is None`) the stock configs go in unchanged (hub datasets; MMLU: all 57
stock subject tasks). `TaskManager(include_defaults=False)` is used: it indexes nothing
(about 0 s instead of about 13 s for the 14.7k stock YAMLs), which is enough because every
task arrives as an inline dict.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .task_table import TRACK1_TASKS, TaskSpec

# lm-eval's own defaults, pinned here so a future default change cannot move results.
RANDOM_SEED = 0
NUMPY_SEED = 1234
TORCH_SEED = 1234
FEWSHOT_SEED = 1234

_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def stock_yaml_path(yaml: str, subject: str | None = None) -> Path:
    rel = yaml.format(subject=subject) if subject is not None else yaml
    p = Path(rel)
    return p if p.is_absolute() else lm_eval_tasks_dir() / p


def load_stock_config(path: Path) -> dict[str, Any]:
    """The stock task config as lm-eval's TaskManager would load it (include + !function resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return copy.deepcopy(load_yaml(path, resolve_func=True))


def stock_subjects(spec: TaskSpec) -> list[str]:
    """All subjects with a stock YAML (MMLU: 57)."""
    pattern = stock_yaml_path(spec.yaml, subject="*")
    prefix, suffix = pattern.name.split("*")
    return sorted(p.name[len(prefix) : len(p.name) - len(suffix)] for p in pattern.parent.glob(pattern.name))


def local_subjects(spec: TaskSpec, data_dir: Path) -> list[str]:
    """Subjects present in the offline slice, sorted."""
    seen = set()
    with open(spec.local_file(data_dir), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                seen.add(json.loads(line)[spec.subject_field])
    return sorted(seen)


def _keep_subject(doc: dict, *, field: str, subject: str) -> bool:
    return doc[field] == subject


def filter_subject(dataset, *, field: str, subject: str, then=None):
    """process_docs for a multi-subject slice: keep one subject, then apply the stock process_docs."""
    out = dataset.filter(_keep_subject, fn_kwargs={"field": field, "subject": subject})
    return then(out) if then is not None else out


@dataclass
class BuiltTask:
    """One lm-eval task config ready for simple_evaluate, with where its data comes from."""

    dataset: str
    task: str  # lm-eval task name
    config: dict[str, Any]
    stock_yaml: Path
    data: str  # "local:<relative file>" | "hub:<id>/<config>"
    subject: str | None = None


def _eval_split(cfg: dict[str, Any]) -> str | None:
    return cfg.get("test_split") or cfg.get("validation_split")


def _check_fewshot_source(spec: TaskSpec, cfg: dict[str, Any], data_dir: Path | None) -> None:
    """Shots must not come from the questions being scored. Without a few-shot split, lm-eval
    draws them from the training split, else validation, else test (`Task.fewshot_docs`), and
    drops the question itself only where fewshot_split names the evaluated split: an offline
    MMLU slice without its dev file put each subject's first test question, answered, into
    its own 5-shot prompt (lm-eval's warning is silenced with its logs)."""
    if not (cfg.get("num_fewshot") or 0) or cfg.get("fewshot_split") is not None:
        return
    source = cfg.get("training_split") or cfg.get("validation_split") or cfg.get("test_split")
    if source == _eval_split(cfg):
        where = f" ({spec.local_file(data_dir, spec.extra_splits[0])} is missing)" if data_dir is not None and spec.extra_splits else ""
        raise FileNotFoundError(f"{spec.name}: {cfg['num_fewshot']}-shot needs a few-shot split apart from the evaluated "
                                f"{source!r} split{where}: the shots would be the test questions themselves")


def build_task_configs(
    spec: TaskSpec, *, data_dir: Path | None, num_fewshot: int | None = None
) -> list[BuiltTask]:
    """The stock config(s) of one dataset, with the offline data overrides when data_dir is given."""
    if spec.per_subject:
        subjects: list[str | None] = local_subjects(spec, data_dir) if data_dir is not None else stock_subjects(spec)
        if not subjects:
            raise ValueError(f"{spec.name}: no subjects found")
    else:
        subjects = [None]

    built = []
    for subject in subjects:
        path = stock_yaml_path(spec.yaml, subject)
        if not path.is_file():
            raise FileNotFoundError(f"{spec.name}: no stock lm-eval task YAML {path} (subject {subject!r})")
        cfg = load_stock_config(path)
        hub_config = spec.hub_config.format(subject=subject) if spec.hub_config and subject else spec.hub_config
        # Guard against drift of the pinned lm-eval version: the table must describe the stock task.
        if cfg.get("dataset_path") != spec.hub_id or cfg.get("dataset_name") != hub_config:
            raise ValueError(
                f"{spec.name}: stock YAML {path} reads {cfg.get('dataset_path')}/{cfg.get('dataset_name')}, "
                f"the task table says {spec.hub_id}/{hub_config}"
            )
        if _eval_split(cfg) != spec.split:
            raise ValueError(f"{spec.name}: stock YAML {path} evaluates split {_eval_split(cfg)!r}, table says {spec.split!r}")

        if data_dir is not None:
            data_dir = Path(data_dir)
            files = {}
            for split in spec.local_splits:
                f = spec.local_file(data_dir, split)
                if f.is_file():
                    files[split] = str(f.resolve())
                elif split == spec.split:
                    raise FileNotFoundError(f"{spec.name}: offline slice {f} is missing")
            cfg["dataset_path"] = "json"
            cfg["dataset_name"] = None
            cfg["dataset_kwargs"] = {"data_files": files}
            for key in _SPLIT_KEYS:
                if cfg.get(key) is not None and cfg[key] not in files:
                    cfg[key] = None
            if subject is not None:
                cfg["process_docs"] = functools.partial(
                    filter_subject, field=spec.subject_field, subject=subject, then=cfg.get("process_docs")
                )
            data = "local:" + spec.local_file(data_dir).relative_to(data_dir).as_posix()
        else:
            data = f"hub:{spec.hub_id}/{hub_config or 'default'}"
        if num_fewshot is not None:
            cfg["num_fewshot"] = num_fewshot
        _check_fewshot_source(spec, cfg, data_dir)
        built.append(BuiltTask(spec.name, cfg["task"], cfg, path, data, subject))
    return built


class _CountingHFLM:
    """Factory for an HFLM subclass that counts log-likelihood requests per task and can hide tqdm."""

    _cls = None

    @classmethod
    def make(cls, *, quiet: bool, **kwargs):
        if cls._cls is None:
            from lm_eval.models.huggingface import HFLM

            class CountingHFLM(HFLM):
                def loglikelihood(self, requests, disable_tqdm: bool = False):
                    for r in requests:
                        self.request_counts[r.task_name] += 1
                    return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

            cls._cls = CountingHFLM
        lm = cls._cls(**kwargs)
        lm.quiet = quiet
        lm.request_counts = Counter()
        return lm


@contextlib.contextmanager
def _quiet_logs(verbose: bool):
    names = ("lm_eval", "datasets")
    old = {n: logging.getLogger(n).level for n in names}
    import datasets

    bars = datasets.is_progress_bar_enabled()
    if not verbose:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)
        if bars:
            datasets.enable_progress_bars()


def _stderr_pct(p: float, n: int) -> float:
    # lm-eval's mean_stderr for a 0/1 metric: sample std / sqrt(n)
    return 100.0 * math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def evaluate_specs(
    model,
    tokenizer,
    specs: Iterable[TaskSpec],
    *,
    data_dir: Path | None,
    limit: int | None,
    batch_size: int = 16,
    fewshot: dict[str, int] | None = None,
    verbose: bool = False,
) -> dict[str, dict]:
    """Evaluate TaskSpec rows in one simple_evaluate call (the generic mechanism; track 6 reuses it)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    specs = list(specs)
    fewshot = fewshot or {}
    built: list[BuiltTask] = []
    for spec in specs:
        built += build_task_configs(spec, data_dir=data_dir, num_fewshot=fewshot.get(spec.name))
    names = [b.task for b in built]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate lm-eval task names: {names}")

    with _quiet_logs(verbose):
        lm = _CountingHFLM.make(quiet=not verbose, pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[b.config for b in built],
            task_manager=TaskManager(include_defaults=False),
            limit=limit,
            log_samples=False,
            random_seed=RANDOM_SEED,
            numpy_random_seed=NUMPY_SEED,
            torch_random_seed=TORCH_SEED,
            fewshot_random_seed=FEWSHOT_SEED,
        )
    res, nsamp = out["results"], out["n-samples"]

    results: dict[str, dict] = {}
    for spec in specs:
        parts = [b for b in built if b.dataset == spec.name]
        key = f"{spec.metric},none"
        per = []
        for b in parts:
            if key not in res.get(b.task, {}):
                raise KeyError(f"{spec.name}: lm-eval reported no {spec.metric!r} for {b.task}: {res.get(b.task)}")
            per.append((b, float(res[b.task][key]), int(nsamp[b.task]["effective"])))
        n = sum(k for _, _, k in per)
        acc = sum(a * k for _, a, k in per) / n  # micro average (plain value for single-task datasets)
        entry = {
            "accuracy_pct": 100.0 * acc,
            "metric": spec.metric,
            "n": n,
            "lm_eval_task": ",".join(b.task for b, _, _ in per),
            "data": parts[0].data if len({b.data for b in parts}) == 1 else f"hub:{spec.hub_id}/<subject>",
            "stderr_pct": _stderr_pct(acc, n),
            "num_fewshot": int(out.get("n-shot", {}).get(parts[0].task, 0) or 0),
            "requests": sum(lm.request_counts[b.task] for b in parts),
        }
        if spec.per_subject:
            entry["subjects"] = {b.subject: {"accuracy_pct": 100.0 * a, "n": k} for b, a, k in per}
        results[spec.name] = entry
    return results


def evaluate_tasks(
    model,
    tokenizer,
    *,
    tasks: list[str],
    data_dir: Path | None,
    limit: int | None,
    batch_size: int = 16,
    mmlu_shots: int = 0,
    verbose: bool = False,
) -> dict[str, dict]:
    """Track 1 accuracies of an already-loaded HF causal LM on our dataset names.

    tasks: any of mmlu, arc_c, arc_e, hellaswag, piqa, winogrande, qnli, mnli.
    data_dir: the project's data slices (offline) or None (stock hub datasets).
    limit: examples per lm-eval task (MMLU: per subject, so n = limit x subjects).
    Returns {dataset: {accuracy_pct, metric, n, lm_eval_task, data, stderr_pct,
    num_fewshot, requests[, subjects]}}.
    """
    unknown = [t for t in tasks if t not in TRACK1_TASKS]
    if unknown:
        raise ValueError(f"unknown track 1 dataset(s) {unknown}; known: {sorted(TRACK1_TASKS)}")
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        return {}
    return evaluate_specs(
        model,
        tokenizer,
        [TRACK1_TASKS[t] for t in tasks],
        data_dir=data_dir,
        limit=limit,
        batch_size=batch_size,
        fewshot={"mmlu": mmlu_shots},
        verbose=verbose,
    )
