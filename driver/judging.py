"""Track 7's judged task: instruction following, scored by an LLM judge the user configures.

The evaluation jobs only generate (they run without a network, in a container or a Slurm
job): with a judge configured, the dense and compressed track-7 jobs also answer the
instruction-following questions and store the answers with their prompts. After both have
run, the driver sends each pair to the judge (any OpenAI-compatible endpoint, both answer
orders, deterministic decoding; tracks/kick/judge.py) and writes the whole judgement, every
raw reply included, to `judge.json` beside the compressed evaluation's result, atomically.
It is cached by what it depends on: the two evaluation jobs, the judge's URL, model and
reply budget (max_tokens), and the prompt version. Summarization has no shipped data
(CNN/DM news articles carry no licence), so it is never judged offline.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import JobFailed, UserError
from .fsio import write_atomic

JUDGE_FILE = "judge.json"
NO_JUDGE_NOTE = ("LLM-KICK instruction following is not scored: no judge configured (--judge-url and --judge-model); "
                 "summarization has no data offline (CNN/DM is not shipped)")


def judge_config(url: str | None, model: str | None, key_env: str | None = None, base: dict | None = None):
    """A JudgeConfig from flags over a matrix file's `judge:` mapping, or None when none is given."""
    from pydantic import ValidationError

    from ..tracks.kick.judge import JudgeConfig

    given = {k: v for k, v in (("base_url", url), ("model", model), ("api_key_env", key_env)) if v is not None}
    data = {**(base or {}), **given}
    if not data:
        return None
    try:
        return JudgeConfig(**data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        flag = {"base_url": "--judge-url", "model": "--judge-model"}.get(key, f"judge.{key}")
        raise UserError(f"judge: {flag}: {err['msg'].removeprefix('Value error, ')}") from None


def load_judged(run_dir: Path) -> dict | None:
    path = Path(run_dir) / JUDGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def judge_identity(compressed_job: str, dense_job: str, judge, prompt_version: str) -> dict:
    """What a judgement depends on: the two evaluations, the judge (URL, model, and the reply
    budget `max_tokens`, which can cut a reply before its scores) and the prompt version.
    The timeout, the request cap and the key's variable do not change a reply."""
    return {"compressed_job": compressed_job, "dense_job": dense_job, "base_url": judge.base_url,
            "model": judge.model, "max_tokens": judge.max_tokens, "prompt_version": prompt_version}


def judge_bench(plan) -> dict:
    """Judge the compressed model's instruction answers against the dense model's (cached)."""
    from ..tracks.kick.judge import PROMPT_VERSION, JudgeError, judge_generations

    comp, dense = plan.runs["compressed eval t7"], plan.runs["dense eval t7"]
    identity = judge_identity(comp.job_hash, dense.job_hash, plan.judge, PROMPT_VERSION)
    old = load_judged(comp.run_dir)
    if old is not None and old.get("identity") == identity:
        return old
    answers = [r.result.metrics.get("track7", {}).get("generations", {}).get("instruction") for r in (comp, dense)]
    if not all(answers):
        raise JobFailed("track 7: the evaluations hold no instruction-following answers to judge", comp.run_dir, "crash")
    try:
        judged = judge_generations(answers[0], answers[1], plan.judge)
    except JudgeError as e:
        raise JobFailed(f"track 7 judge: {e}", comp.run_dir, "judge") from None
    body = {"identity": identity, "metric": "kick_instruction", **judged}
    write_atomic(comp.run_dir / JUDGE_FILE, json.dumps(body, indent=2) + "\n")
    return body
