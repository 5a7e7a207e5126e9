"""Track 7 (LLM-KICK): knowledge-intensive tasks of an already-loaded model (factoid QA,
MMLU 5-shot, TriviaQA retrieval QA, instruction-following generations) and a pairwise
LLM judge client for the judge-scored tasks."""

from .evaluate import evaluate_kick
from .judge import JudgeConfig, JudgeError, judge_generations, judge_pairwise
from .metrics import exact_match, f1, kick_match, normalize_answer

__all__ = [
    "evaluate_kick",
    "JudgeConfig",
    "JudgeError",
    "judge_pairwise",
    "judge_generations",
    "normalize_answer",
    "exact_match",
    "f1",
    "kick_match",
]
