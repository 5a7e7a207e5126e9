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

`judge.json` is written after its evaluation's result.json is sealed, so nothing sealed
records its hash: it seals itself as result.json does (`self_sha256` over its canonical
JSON), and names the two evaluations it judged. A reader trusts it only when the seal holds
and it judges the run it sits in (`judgement_problem`); the report also demands that its
dense job be the cell's dense baseline. A bundle carries it under its manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .contract import canonical_json
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
        config = JudgeConfig(**data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        flag = {"base_url": "--judge-url", "model": "--judge-model"}.get(key, f"judge.{key}")
        raise UserError(f"judge: {flag}: {err['msg'].removeprefix('Value error, ')}") from None
    if config.api_key_env and not os.environ.get(config.api_key_env):  # the judge is asked after every job has run
        raise UserError(f"judge: the API key's environment variable {config.api_key_env} (--judge-key-env) is not set: "
                        "export it before the run")
    return config


def load_judged(run_dir: Path) -> dict | None:
    path = Path(run_dir) / JUDGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def seal_judgement(body: dict) -> dict:
    """`body` with `self_sha256`, the sha256 of the rest as canonical JSON (after a JSON round
    trip, so the digest is the one a reader recomputes from the file)."""
    body = {k: v for k, v in json.loads(json.dumps(body)).items() if k != "self_sha256"}
    return {**body, "self_sha256": hashlib.sha256(canonical_json(body).encode()).hexdigest()}


def judgement_problem(run_dir: Path, job_hash: str) -> str | None:
    """Why the judge.json in the run dir of compressed evaluation `job_hash` is not to be
    trusted (unreadable, seal broken by an edit, or the judgement of another job), or None,
    also when there is none."""
    path = Path(run_dir) / JUDGE_FILE
    if not path.is_file():
        return None
    try:
        judged = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{JUDGE_FILE}: not valid JSON ({e.__class__.__name__})"
    if not isinstance(judged, dict) or judged.get("self_sha256") != seal_judgement(judged)["self_sha256"]:
        return f"{JUDGE_FILE}: checksum mismatch (edited, corrupted, or written unsealed)"
    judged_job = (judged.get("identity") or {}).get("compressed_job")
    if judged_job != job_hash:
        return f"{JUDGE_FILE}: judges job {str(judged_job)[:12]}, not this run's"
    return None


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
    old = load_judged(comp.run_dir) if judgement_problem(comp.run_dir, comp.job_hash) is None else None
    if old is not None and old.get("identity") == identity:
        return old
    answers = [r.result.metrics.get("track7", {}).get("generations", {}).get("instruction") for r in (comp, dense)]
    if not all(answers):
        raise JobFailed("track 7: the evaluations hold no instruction-following answers to judge", comp.run_dir, "crash")
    try:
        judged = judge_generations(answers[0], answers[1], plan.judge)
    except JudgeError as e:
        raise JobFailed(f"track 7 judge: {e}", comp.run_dir, "judge") from None
    body = seal_judgement({"identity": identity, "metric": "kick_instruction", **judged})
    write_atomic(comp.run_dir / JUDGE_FILE, json.dumps(body, indent=2) + "\n")
    return body
