"""Track 6 (trustworthiness) of an already-loaded model: AdvGLUE robustness and TruthfulQA.

SPEC.md section 5: AdvGLUE's six tasks (sst2, qqp, mnli, mnli-mm, qnli, rte), 0-shot,
correct label maps, and TruthfulQA MC1/MC2, all in %. The eight datasets are
`TaskSpec` rows (task_table.py) run in one lm-eval `simple_evaluate` call by track 1's
`evaluate_specs`, so the lm-eval wrapper, seeds and offline data redirection are the
same as track 1's.

`stderr` in the details is `evaluate_specs`'s binomial one, sqrt(p(1-p)/(n-1)). That is
lm-eval's own stderr for the 0/1 accuracies; for MC2, whose per-question score is a
probability mass in [0, 1], it is an upper bound (a [0, 1] variable with mean p has
variance at most p(1-p)).
"""

from __future__ import annotations

from pathlib import Path

from llmcbench.tracks.performance.lm_eval_tasks import evaluate_specs

from .task_table import TRUST_TASKS


def evaluate_trust(model, tokenizer, *, data_dir: Path | None, limit: int | None, batch_size: int = 16) -> dict:
    """AdvGLUE and TruthfulQA scores (%) of an HF causal LM.

    data_dir: the project's data slices (offline, `hf/<hub id>/<config>/<split>.jsonl`) or
    None (hub datasets AI-Secure/adv_glue and truthfulqa/truthful_qa).
    limit: examples per task (None: all).
    Returns {advglue_sst2, advglue_qqp, advglue_mnli, advglue_mnli_mm, advglue_qnli,
    advglue_rte, truthfulqa_mc1, truthfulqa_mc2: percent, "details": {name: {n, stderr,
    data, lm_eval_task, requests}}}.
    """
    res = evaluate_specs(
        model,
        tokenizer,
        TRUST_TASKS.values(),
        data_dir=Path(data_dir) if data_dir is not None else None,
        limit=limit,
        batch_size=batch_size,
    )
    out: dict = {name: r["accuracy_pct"] for name, r in res.items()}
    out["details"] = {
        name: {
            "n": r["n"],
            "stderr": r["stderr_pct"],
            "data": r["data"],
            "lm_eval_task": r["lm_eval_task"],
            "requests": r["requests"],
        }
        for name, r in res.items()
    }
    return out
