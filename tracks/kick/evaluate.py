"""Track 7 (LLM-KICK, Jaiswal et al. 2023) of an already-loaded model.

LLM-KICK's five knowledge-intensive tasks and how each is measured here:

| task | data | answer | metric (key) |
|---|---|---|---|
| factoid QA | FreebaseQA (slice: eval, first 200) | greedy, first line | EM vs any alias (`kick_factoid_em`) |
| multiple-choice QA | MMLU, 5-shot (slice: 4 subjects) | lm-eval stock mmlu, log-likelihood of A-D | accuracy (`kick_mcqa_acc`) |
| in-context retrieval QA | TriviaQA rc | greedy, first line | EM and F1 vs aliases (`kick_icr_em`, `kick_icr_f1`) |
| summarization | CNN/DM stories | - | judge score (not scored here) |
| instruction following | 80 Vicuna-bench questions | greedy, chat template | judge score (not scored here) |

EM/F1 are TriviaQA's official ones (metrics.py). LLM-KICK's own looser match
(substring either way) is kept in the details as `kick_protocol_match_pct`. Differences
from LLM-KICK's scripts, on purpose: FreebaseQA eval split instead of train (the slice);
MMLU scored by lm-eval's log-likelihood over A-D instead of generating one token and
reading its last character (fragile with tokenizers); ICR evidence cut by tokens instead
of characters; generation stops at the first newline.

Offline (`data_dir` given) ICR-QA is closed-book: the shipped TriviaQA slice has no
evidence. Online (`data_dir is None`) it is open-book on the hub dataset
`mandarjoshi/trivia_qa` rc, LLM-KICK's setting. The two settings are different numbers;
`details[...]["setting"]` says which one a result is.

Summarization and instruction following need an LLM judge (judge.py) and hence network,
which evaluation containers do not have: `evaluate_kick` never calls it. With
`instruction=True` it generates the answers to the 80 questions, to be judged later
against the dense model's answers (`judge.judge_generations`). No CNN/DM stories ship
(news articles under no stated licence), so summarization is not run at all.
"""

from __future__ import annotations

from pathlib import Path

from llmcbench.tracks.performance.lm_eval_tasks import evaluate_specs
from llmcbench.tracks.performance.task_table import TRACK1_TASKS

from . import data as kdata
from .generate import factoid_prompt, greedy_generate, icr_prompt, instruction_prompt, truncate_tokens
from .metrics import best, exact_match, f1, first_line, kick_match, mean_pct, stderr_pct

MMLU_SHOTS = 5  # LLM-KICK's MCR-QA setting (--ntrain 5)


def _records(items: list[dict], prompts: list[str], outputs: list[str]) -> list[dict]:
    return [
        {"id": it["id"], "prompt": p, "answer": first_line(o), "output": o, "references": it["references"]}
        for it, p, o in zip(items, prompts, outputs)
    ]


def _score(records: list[dict], metric) -> list[float]:
    return [best(metric, r["answer"], r["references"]) for r in records]


def _factoid_kick_match(output: str, references: list[str]) -> float:
    """LLM-KICK factoid_qa's validate_response: an alias, spaces removed, in the lower-cased output."""
    out = output.strip().replace(" ", "").lower()
    return float(any(r.strip().replace(" ", "").lower() in out for r in references if r.strip()))


def run_factoid(model, tokenizer, *, data_dir, limit, batch_size, device, max_new_tokens) -> tuple[dict, list[dict]]:
    items, source = kdata.load_freebaseqa(data_dir, limit)
    prompts = [factoid_prompt(it["question"]) for it in items]
    records = _records(items, prompts, greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                       batch_size=batch_size, device=device))
    em = _score(records, exact_match)
    return {
        "kick_factoid_em": {
            "value": mean_pct(em), "n": len(em), "stderr": stderr_pct(em), "data": source,
            "kick_protocol_match_pct": mean_pct([_factoid_kick_match(r["output"], r["references"]) for r in records]),
        }
    }, records


def run_icr(model, tokenizer, *, data_dir, limit, batch_size, device, max_new_tokens,
            context_tokens) -> tuple[dict, list[dict]]:
    items, source = kdata.load_triviaqa(data_dir, limit)
    open_book = any("evidence" in it for it in items)
    prompts = [
        icr_prompt(it["question"], truncate_tokens(tokenizer, it["evidence"], context_tokens) if open_book else None)
        for it in items
    ]
    records = _records(items, prompts, greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                       batch_size=batch_size, device=device))
    em, f = _score(records, exact_match), _score(records, f1)
    common = {"n": len(records), "data": source, "setting": "open_book" if open_book else "closed_book"}
    if open_book:
        common["context_tokens"] = context_tokens
    return {
        "kick_icr_em": {"value": mean_pct(em), "stderr": stderr_pct(em), **common,
                        "kick_protocol_match_pct": mean_pct(_score(records, kick_match))},
        "kick_icr_f1": {"value": mean_pct(f), "stderr": stderr_pct(f), **common},
    }, records


def run_mcqa(model, tokenizer, *, data_dir, limit, batch_size) -> dict:
    """MMLU 5-shot through track 1's stock lm-eval mmlu tasks (limit is per subject)."""
    r = evaluate_specs(model, tokenizer, [TRACK1_TASKS["mmlu"]], data_dir=data_dir, limit=limit,
                       batch_size=batch_size, fewshot={"mmlu": MMLU_SHOTS})["mmlu"]
    return {
        "kick_mcqa_acc": {
            "value": r["accuracy_pct"], "n": r["n"], "stderr": r["stderr_pct"], "data": r["data"],
            "num_fewshot": r["num_fewshot"], "lm_eval_task": r["lm_eval_task"], "subjects": r.get("subjects"),
        }
    }


def run_instruction(model, tokenizer, *, data_dir, limit, batch_size, device, max_new_tokens) -> tuple[dict, list[dict]]:
    items, source = kdata.load_mt_questions(data_dir, limit)
    built = [instruction_prompt(tokenizer, it["question"]) for it in items]
    prompts = [p for p, _ in built]
    templated = bool(built) and built[0][1]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              device=device, stop_at_newline=False, add_special_tokens=not templated)
    records = [
        {"id": it["id"], "category": it["category"], "question": it["question"], "prompt": p, "answer": o.strip(),
         "references": []}
        for it, p, o in zip(items, prompts, outputs)
    ]
    return {"kick_instruction": {"n": len(records), "data": source, "scored": False,
                                 "max_new_tokens": max_new_tokens}}, records


def evaluate_kick(
    model,
    tokenizer,
    *,
    data_dir: Path | None,
    limit: int | None,
    batch_size: int = 8,
    device=None,
    max_new_tokens: int = 32,
    instruction: bool = False,
    instruction_max_new_tokens: int = 256,
    context_tokens: int = 768,
) -> dict:
    """LLM-KICK scores (%) of an HF causal LM, plus the generations they were computed from.

    data_dir: the project's data slices (offline; ICR closed-book) or None (hub MMLU and
    open-book TriviaQA rc; FreebaseQA and the instruction questions from the shipped copy).
    limit: questions per task (MMLU: per subject, 4 subjects offline).
    instruction: also generate answers to the instruction-following questions (slow on CPU).
    context_tokens: evidence budget of open-book ICR-QA.
    Returns {kick_factoid_em, kick_mcqa_acc, kick_icr_em, kick_icr_f1: percent,
    "generations": {"factoid"|"icr"[|"instruction"]: [{id, prompt, answer, output, references}]},
    "details": {metric: {n, stderr, data, ...}}, "notes": [str]}.
    """
    data_dir = Path(data_dir) if data_dir is not None else None
    gen = {"batch_size": batch_size, "device": device}
    details: dict[str, dict] = {}
    generations: dict[str, list[dict]] = {}

    d, generations["factoid"] = run_factoid(model, tokenizer, data_dir=data_dir, limit=limit,
                                            max_new_tokens=max_new_tokens, **gen)
    details.update(d)
    details.update(run_mcqa(model, tokenizer, data_dir=data_dir, limit=limit, batch_size=batch_size))
    d, generations["icr"] = run_icr(model, tokenizer, data_dir=data_dir, limit=limit, max_new_tokens=max_new_tokens,
                                    context_tokens=context_tokens, **gen)
    details.update(d)
    if instruction:
        d, generations["instruction"] = run_instruction(model, tokenizer, data_dir=data_dir, limit=limit,
                                                        max_new_tokens=instruction_max_new_tokens, **gen)
        details.update(d)

    result: dict = {name: details[name].pop("value") for name in
                    ("kick_factoid_em", "kick_mcqa_acc", "kick_icr_em", "kick_icr_f1")}
    result.update(generations=generations, details=details, notes=_notes(details, instruction))
    return result


def _notes(details: dict, instruction: bool) -> list[str]:
    icr = details["kick_icr_em"]
    notes = []
    if icr["setting"] == "closed_book":
        notes.append("ICR-QA ran closed-book: the shipped TriviaQA slice has no evidence text; open-book "
                     "(LLM-KICK's setting) needs the hub dataset mandarjoshi/trivia_qa rc and runs when data_dir is None")
    else:
        notes.append(f"ICR-QA ran open-book on {icr['data']}, evidence cut to {icr['context_tokens']} tokens")
    notes.append("kick_summarization and kick_instruction are not scored: no judge configured "
                 "(evaluate_kick never calls one; judge the generations with tracks.kick.judge)")
    notes.append("summarization not run: no CNN/DailyMail stories ship (news articles under no stated licence)")
    if instruction:
        notes.append(f"instruction-following answers generated for {details['kick_instruction']['n']} questions, "
                     "not yet judged")
    else:
        notes.append("instruction-following answers not generated (instruction=False)")
    notes.append("EM/F1 are TriviaQA's official ones on the first line of the answer; LLM-KICK's looser "
                 "substring match is in details as kick_protocol_match_pct")
    return notes
