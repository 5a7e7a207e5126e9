"""Where LLM-KICK's questions come from, offline (project data slices) or online (hub).

Every loader returns a list of items `{"id", "question", "references"[, "evidence"]}`.

- Factoid QA: FreebaseQA. The slice `freebaseqa/eval.jsonl` (first 200 questions of the
  FreebaseQA v1.1 eval set, see tracks/data/SOURCES.md) has `question` and `answers` (all
  distinct answer strings of all parses). LLM-KICK used the train JSON; no hub dataset
  with a loader that works with current `datasets` exists, so the shipped slice is read
  online too.
- In-context retrieval QA: TriviaQA rc. The slice
  `hf/mandarjoshi__trivia_qa/rc.nocontext/validation.jsonl` has no evidence text, so
  offline ICR is closed-book. Online the hub dataset `mandarjoshi/trivia_qa` config `rc`
  (validation, streamed) provides evidence: LLM-KICK's wiki_context[0] + search_context[0].
- Instruction following: the 80 Vicuna-bench style questions LLM-KICK ships
  (`llm_kick/mt_question.jsonl`), read from the shipped copy online too.
"""

from __future__ import annotations

import json
from pathlib import Path

SHIPPED_DATA = Path(__file__).resolve().parent.parent / "data"

FREEBASEQA = "freebaseqa/eval.jsonl"
# the same 200 questions under the name the shared data manifest gives them (../shared/data,
# MANIFEST.md): a --data-dir pointing there is read as well as the shipped copy
FREEBASEQA_MANIFEST_NAME = "freebaseqa/freebaseqa_eval_first200.jsonl"
TRIVIAQA_NOCONTEXT = "hf/mandarjoshi__trivia_qa/rc.nocontext/validation.jsonl"
TRIVIAQA_HUB = ("mandarjoshi/trivia_qa", "rc", "validation")
MT_QUESTIONS = "llm_kick/mt_question.jsonl"


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"data slice {path} is missing (see tracks/data/SOURCES.md)")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _local(data_dir: Path | None, rel: str) -> tuple[Path, str]:
    root = Path(data_dir) if data_dir is not None else SHIPPED_DATA
    return root / rel, f"local:{rel}"


def load_freebaseqa(data_dir: Path | None, limit: int | None) -> tuple[list[dict], str]:
    path, source = _local(data_dir, FREEBASEQA)
    alternative, alt_source = _local(data_dir, FREEBASEQA_MANIFEST_NAME)
    if not path.is_file() and alternative.is_file():
        path, source = alternative, alt_source
    items = [
        {"id": f"freebaseqa-eval-{i}", "question": r["question"], "references": list(r["answers"])}
        for i, r in enumerate(read_jsonl(path, limit))
    ]
    return items, source


def _trivia_references(answer: dict) -> list[str]:
    return list(dict.fromkeys([*answer["aliases"], *answer["normalized_aliases"]]))


def load_triviaqa(data_dir: Path | None, limit: int | None) -> tuple[list[dict], str]:
    """Closed-book items from the slice (data_dir given) or open-book items from the hub."""
    if data_dir is not None:
        path, source = _local(data_dir, TRIVIAQA_NOCONTEXT)
        rows = read_jsonl(path, limit)
        return [{"id": r["question_id"], "question": r["question"], "references": _trivia_references(r["answer"])}
                for r in rows], source
    import datasets

    hub_id, config, split = TRIVIAQA_HUB
    stream = datasets.load_dataset(hub_id, config, split=split, streaming=True)
    items = []
    for r in stream:
        if limit is not None and len(items) >= limit:
            break
        items.append({"id": r["question_id"], "question": r["question"], "references": _trivia_references(r["answer"]),
                      "evidence": kick_evidence(r)})
    return items, f"hub:{hub_id}/{config}"


def kick_evidence(row: dict) -> str:
    """LLM-KICK's context: the first Wikipedia page text, then the first web search result text."""
    wiki = row["entity_pages"]["wiki_context"]
    web = row["search_results"]["search_context"]
    return (wiki[0] if wiki else "") + (web[0] if web else "")


def load_mt_questions(data_dir: Path | None, limit: int | None) -> tuple[list[dict], str]:
    path, source = _local(data_dir, MT_QUESTIONS)
    items = [{"id": r["question_id"], "question": r["text"], "category": r["category"], "references": []}
             for r in read_jsonl(path, limit)]
    return items, source
