"""Track 6 (trustworthiness): AdvGLUE robustness and TruthfulQA MC1/MC2 of an already-loaded
model, through track 1's lm-eval mechanism, offline (project data slices) or online (hub)."""

from .evaluate import evaluate_trust
from .task_table import GLUE_LABELS, ROBUSTNESS, TRUST_TASKS, TRUTHFULNESS, label_map

__all__ = ["evaluate_trust", "TRUST_TASKS", "GLUE_LABELS", "ROBUSTNESS", "TRUTHFULNESS", "label_map"]
