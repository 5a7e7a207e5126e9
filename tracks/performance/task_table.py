"""Track 1 datasets as data: which stock lm-eval task, which hub dataset, which split, which metric.

Every evaluated dataset is one `TaskSpec` row. The stock lm-eval YAML named by `yaml` (a
path relative to the installed `lm_eval/tasks/`, or absolute) defines prompt, choices,
process_docs and metrics; the row only adds what the harness needs around it:

- `hub_id` / `hub_config`: the Hugging Face dataset the stock YAML reads (checked against
  the YAML's `dataset_path` / `dataset_name` at load time, so a drift of the pinned
  lm-eval version is caught instead of silently evaluating something else);
- `split`: the split the stock task evaluates (its `test_split`, else `validation_split`);
- `local_config` + the split name: where the offline slice lives under `data_dir`
  (`hf/<hub id with / as __>/<local_config>/<split>.jsonl`, see shared/data/MANIFEST.md);
- `metric`: which lm-eval metric is the reported accuracy.

A later track (track 6: AdvGLUE, TruthfulQA) adds rows of the same shape to its own table
and calls `llmcbench.tracks.performance.lm_eval_tasks.build_task_configs` /
`evaluate_specs` with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class TaskSpec:
    name: str  # our dataset name (the key in results)
    yaml: str  # stock task YAML, relative to lm_eval/tasks/ (may contain "{subject}")
    hub_id: str  # HF dataset id the stock YAML reads (dataset_path)
    hub_config: str | None  # HF config (dataset_name); None = the dataset's default config
    split: str  # split the stock task evaluates
    metric: Literal["acc", "acc_norm"]
    ability: Literal["knowledge", "inference", "robustness", "truthfulness"]
    local_config: str | None = None  # directory under hf/<hub id>/ offline; default hub_config or "default"
    extra_splits: tuple[str, ...] = ()  # further local splits the task may read (e.g. the fewshot split)
    # Per-subject datasets (MMLU): one stock task per subject, micro-averaged.
    subject_field: str | None = None  # offline: the slice's field naming the subject
    notes: str = ""

    @property
    def per_subject(self) -> bool:
        return "{subject}" in self.yaml

    @property
    def local_dir_name(self) -> str:
        return self.local_config or self.hub_config or "default"

    def local_file(self, data_dir: Path, split: str | None = None) -> Path:
        return Path(data_dir) / "hf" / self.hub_id.replace("/", "__") / self.local_dir_name / f"{split or self.split}.jsonl"

    @property
    def local_splits(self) -> tuple[str, ...]:
        return (self.split, *self.extra_splits)


TRACK1_TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        TaskSpec(
            name="mmlu",
            yaml="mmlu/default/mmlu_{subject}.yaml",
            hub_id="cais/mmlu",
            hub_config="{subject}",
            split="test",
            metric="acc",
            ability="knowledge",
            local_config="four_subjects",
            extra_splits=("dev",),
            subject_field="subject",
            notes="0-shot by default (mmlu_shots: fewshot from dev, stock first_n sampler); "
            "overall = micro average over all questions",
        ),
        TaskSpec("arc_c", "arc/arc_challenge.yaml", "allenai/ai2_arc", "ARC-Challenge", "test", "acc_norm", "knowledge"),
        TaskSpec("arc_e", "arc/arc_easy.yaml", "allenai/ai2_arc", "ARC-Easy", "test", "acc_norm", "knowledge"),
        TaskSpec("hellaswag", "hellaswag/hellaswag.yaml", "Rowan/hellaswag", None, "validation", "acc_norm", "inference"),
        TaskSpec("piqa", "piqa/piqa.yaml", "baber/piqa", None, "validation", "acc_norm", "inference"),
        TaskSpec("winogrande", "winogrande/default.yaml", "allenai/winogrande", "winogrande_xl", "validation", "acc", "inference"),
        TaskSpec("qnli", "glue/qnli/default.yaml", "nyu-mll/glue", "qnli", "validation", "acc", "inference",
                 notes="multiple choice over the label words yes/no (stock glue task)"),
        TaskSpec("mnli", "glue/mnli/mismatch.yaml", "nyu-mll/glue", "mnli", "validation_mismatched", "acc", "inference",
                 notes="validation-mismatched, multiple choice over True/Neither/False (stock mnli_mismatch)"),
    ]
}

KNOWLEDGE = tuple(n for n, s in TRACK1_TASKS.items() if s.ability == "knowledge")
INFERENCE = tuple(n for n, s in TRACK1_TASKS.items() if s.ability == "inference")


@dataclass(frozen=True)
class TextSpec:
    """A raw-text dataset for perplexity (not an lm-eval task)."""

    name: str
    hub_id: str
    hub_config: str
    split: str
    text_field: str = "text"
    notes: str = ""
    local_config: str | None = None

    def local_file(self, data_dir: Path) -> Path:
        return Path(data_dir) / "hf" / self.hub_id.replace("/", "__") / (self.local_config or self.hub_config) / f"{self.split}.jsonl"


WIKITEXT2 = TextSpec(
    name="wikitext2",
    hub_id="Salesforce/wikitext",
    hub_config="wikitext-2-raw-v1",
    split="test",
    notes="the offline slice (from wiki.test.raw) lacks the hub's blank rows, so the "
    "'\\n\\n'-joined text differs slightly from the hub's and so does the ppl",
)
