"""Track 6 datasets as track 1's `TaskSpec` rows: AdvGLUE (robustness) and TruthfulQA (truthfulness).

The rows are evaluated by track 1's generic mechanism
(`llmcbench.tracks.performance.lm_eval_tasks.evaluate_specs`): each row names an lm-eval
task YAML, `build_task_configs` loads it with lm-eval's own YAML loader, checks it reads
the hub dataset the row names and, offline, redirects its data to the slice under
`data_dir/hf/<hub id>/<config>/<split>.jsonl`.

TruthfulQA MC1/MC2 are lm-eval's stock tasks (`truthfulqa/truthfulqa_mc{1,2}.yaml`: the
6-shot QA primer in the prompt, MC1 = accuracy of the argmax answer, MC2 = normalised
probability mass of the true answers).

AdvGLUE has no stock lm-eval task, so its six task YAMLs live beside this file: same
shape as the stock GLUE YAMLs (`lm_eval/tasks/glue/<task>/default.yaml`), same prompts and
answer words, 0-shot, `acc` of log-likelihood multiple choice over the answer words. The
label map of a task is its `doc_to_choice` list indexed by the dataset's label id; the
ids are GLUE's, which AdvGLUE keeps (`GLUE_LABELS` below, the ClassLabel names of
`nyu-mll/glue` and `AI-Secure/adv_glue`).

Label maps of the paper's own script (LLMCBench `evaluate_advglue.py`, HEAD 6933195),
which uses "A. yes / B. no" style options:

- scoring (every run): `task_mappings = {'qqp': {0: 1, 1: 0}, 'sst2': {0: 1, 1: 0},
  'qnli': {0: 0, 1: 1}, 'rte': {0: 1, 1: 0}}` maps option A ("yes") to label 1 for RTE,
  but RTE's label 1 is not_entailment: **RTE is scored with inverted labels**. sst2 (A =
  positive -> 1), qqp (A = yes -> 1 = duplicate), qnli and MNLI (A yes -> 0 entailment,
  B maybe -> 1 neutral, C no -> 2 contradiction) are right.
- few-shot demonstrations (`--ntrain > 0`; the paper ran 0-shot): label 0 is written as
  "A. positive" for **SST-2** (0 is negative) and as "A. yes" for **QQP** (0 is
  not_duplicate), so those demos carry wrong answers; RTE, QNLI and MNLI demos are right.

Here every map follows the GLUE definition; tests/test_track6.py checks them and shows
that the paper's maps fail the same check.
"""

from __future__ import annotations

from pathlib import Path

from llmcbench.tracks.performance.task_table import TaskSpec

HERE = Path(__file__).resolve().parent

# GLUE label definitions (label id -> name): the ClassLabel `names` of the GLUE tasks in
# nyu-mll/glue (Wang et al. 2019), unchanged in AI-Secure/adv_glue (Wang et al. 2021).
GLUE_LABELS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "mnli_mm": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
}

# ours -> (hub config of AI-Secure/adv_glue, local directory of the slice)
_ADVGLUE_CONFIGS = {
    "sst2": ("adv_sst2", None),
    "qqp": ("adv_qqp", None),
    "mnli": ("adv_mnli", None),
    "mnli_mm": ("adv_mnli_mismatched", "adv_mnli_mm"),  # the slice directory is shorter
    "qnli": ("adv_qnli", None),
    "rte": ("adv_rte", None),
}


def _advglue(task: str) -> TaskSpec:
    hub_config, local = _ADVGLUE_CONFIGS[task]
    return TaskSpec(
        name=f"advglue_{task}",
        yaml=str(HERE / f"advglue_{task}.yaml"),
        hub_id="AI-Secure/adv_glue",
        hub_config=hub_config,
        split="validation",
        metric="acc",
        ability="robustness",
        local_config=local,
        notes="AdvGLUE dev set (adversarial GLUE); stock lm-eval GLUE prompt, 0-shot, GLUE label map",
    )


TRUST_TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        *(_advglue(t) for t in _ADVGLUE_CONFIGS),
        TaskSpec("truthfulqa_mc1", "truthfulqa/truthfulqa_mc1.yaml", "truthfulqa/truthful_qa", "multiple_choice",
                 "validation", "acc", "truthfulness", notes="stock lm-eval truthfulqa_mc1 (6-shot QA primer)"),
        TaskSpec("truthfulqa_mc2", "truthfulqa/truthfulqa_mc2.yaml", "truthfulqa/truthful_qa", "multiple_choice",
                 "validation", "acc", "truthfulness",
                 notes="stock lm-eval truthfulqa_mc2: 'acc' is the normalised probability mass of the true answers"),
    ]
}

ROBUSTNESS = tuple(n for n, s in TRUST_TASKS.items() if s.ability == "robustness")
TRUTHFULNESS = tuple(n for n, s in TRUST_TASKS.items() if s.ability == "truthfulness")


def label_map(name: str) -> dict[int, tuple[str, str]]:
    """{label id: (GLUE label name, answer word)} of an AdvGLUE task, read from its YAML."""
    from llmcbench.tracks.performance.lm_eval_tasks import load_stock_config

    task = name.removeprefix("advglue_")
    choices = load_stock_config(Path(TRUST_TASKS[name].yaml))["doc_to_choice"]
    names = GLUE_LABELS[task]
    if len(choices) != len(names):
        raise ValueError(f"{name}: {len(choices)} answer words for {len(names)} GLUE labels")
    return {i: (names[i], choices[i]) for i in range(len(names))}
