"""Track 1 (compression performance): lm-eval accuracies and WikiText-2 perplexity of an
already-loaded model, offline (project data slices) or online (stock hub datasets)."""

from .lm_eval_tasks import build_task_configs, evaluate_specs, evaluate_tasks, load_stock_config, stock_yaml_path
from .perplexity import wikitext2_ppl
from .task_table import INFERENCE, KNOWLEDGE, TRACK1_TASKS, WIKITEXT2, TaskSpec, TextSpec

__all__ = [
    "evaluate_tasks",
    "evaluate_specs",
    "build_task_configs",
    "load_stock_config",
    "stock_yaml_path",
    "wikitext2_ppl",
    "TaskSpec",
    "TextSpec",
    "TRACK1_TASKS",
    "WIKITEXT2",
    "KNOWLEDGE",
    "INFERENCE",
]
