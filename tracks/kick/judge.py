"""A small pairwise LLM judge over any OpenAI-compatible chat-completions endpoint.

LLM-KICK scores summarization and instruction following with GPT-4 as a judge: for each
question the judge sees two answers ("Assistant 1", "Assistant 2") and replies with two
scores from 1 to 10 on its first line. Their scripts always put the reference model's
answer first, sample the judge at temperature 0.1-0.2 and store unparsable replies as -1.
LLM judges favour one position, so here every item is judged in BOTH orders (A first,
then B first) and an answer's score is the mean of its two scores; decoding is
deterministic (temperature 0, top_p 1, fixed seed); an item whose reply cannot be parsed
in either order is left unscored and counted, never averaged as -1.

The client uses only the standard library (urllib), sends at most
`JudgeConfig.max_requests` requests (checked before the first one is sent) and turns
every transport failure into one-line `JudgeError`s. `evaluate_kick` never calls it:
evaluation containers have no network; the driver judges stored generations afterwards.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.error
import urllib.request

from pydantic import BaseModel, ConfigDict, Field, field_validator

# v2: the replies' scores are read differently ("8/10 6/10" is 8 and 6): a judgement parsed by v1 is redone
PROMPT_VERSION = "llmcbench-pairwise-v2"

SYSTEM_PROMPT = "You are a strict and impartial reviewer of answers written by AI assistants."

USER_TEMPLATE = """Read the question and the two answers below.

[Question]
{question}

[Answer of Assistant 1]
{answer_1}
[End of the answer of Assistant 1]

[Answer of Assistant 2]
{answer_2}
[End of the answer of Assistant 2]

Score each answer from 1 (useless) to 10 (excellent) for how helpful, correct, relevant and \
complete it is as an answer to the question. Judge the content only: the order of the two \
answers and their length must not affect the scores.
Reply with the two scores on the first line, Assistant 1's first, separated by a space \
(for example: 6 9), then give a short justification on the following lines."""

# two scores on the first line, each optionally written out of ten ("8/10 6/10", a common
# judge habit); "/" is no separator: "8/10 6/10" read as (8, 10) gave every second answer a 10
_SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)(?:\s*/\s*10)?\s*[,; ]\s*(\d+(?:\.\d+)?)(?:\s*/\s*10)?\b")


class JudgeError(RuntimeError):
    """The judge could not be asked (bad config, request budget, network, HTTP, bad reply)."""


class JudgeConfig(BaseModel):
    """Where the judge is and how much it may be asked.

    base_url: the API root, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1"
    (requests go to base_url + "/chat/completions"). api_key_env: name of the environment
    variable holding the bearer token (None: no Authorization header).
    """

    model_config = ConfigDict(extra="forbid")

    base_url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = Field(60.0, gt=0)
    max_requests: int = Field(200, ge=1)
    max_tokens: int = Field(256, ge=1)

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


class JudgeClient:
    """Sends chat-completions requests, never more than config.max_requests in its lifetime."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.sent = 0
        self.url = config.base_url + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise JudgeError(f"judge API key: environment variable {config.api_key_env} is not set")
            self._headers["Authorization"] = f"Bearer {key}"

    def reserve(self, n: int) -> None:
        """Refuse up front a batch that would exceed the request budget."""
        if self.sent + n > self.config.max_requests:
            raise JudgeError(f"judge request budget exceeded: {n} more requests needed, {self.sent} of "
                             f"max_requests={self.config.max_requests} already sent; raise max_requests or judge fewer items")

    def body(self, messages: list[dict]) -> dict:
        return {"model": self.config.model, "messages": messages, "temperature": 0, "top_p": 1, "n": 1,
                "seed": 0, "max_tokens": self.config.max_tokens}

    def chat(self, messages: list[dict]) -> str:
        self.reserve(1)
        data = json.dumps(self.body(messages)).encode("utf-8")
        req = urllib.request.Request(self.url, data=data, headers=self._headers, method="POST")
        self.sent += 1
        t = self.config.timeout_s
        try:
            with urllib.request.urlopen(req, timeout=t) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            raise JudgeError(f"judge {self.url} answered HTTP {e.code}: {_one_line(e.read().decode('utf-8', 'replace'))}") from None
        except (TimeoutError, socket.timeout) as e:
            raise JudgeError(f"judge {self.url} did not answer within timeout_s={t} s") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise JudgeError(f"judge {self.url} did not answer within timeout_s={t} s") from None
            raise JudgeError(f"judge {self.url} unreachable: {_one_line(e.reason)}") from None
        try:
            return json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {self.url} sent no chat completion: {_one_line(payload.decode('utf-8', 'replace'))}") from None


def parse_scores(reply: str) -> tuple[float, float] | None:
    """(score of Assistant 1, score of Assistant 2) from the reply's first line, or None."""
    m = _SCORES.match(reply.strip().splitlines()[0] if reply.strip() else "")
    if not m:
        return None
    a, b = float(m.group(1)), float(m.group(2))
    return (a, b) if 1 <= a <= 10 and 1 <= b <= 10 else None


def _messages(question: str, first: str, second: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(question=question, answer_1=first, answer_2=second)}]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def judge_pairwise(questions: list[str], answers_a: list[str], answers_b: list[str], config: JudgeConfig) -> dict:
    """Judge answers_a against answers_b on each question, in both answer orders.

    Returns {"mean_a", "mean_b" (over items scored in both orders; None if none),
    "n", "n_scored", "parse_failures", "requests",
    "items": [{"index", "score_a", "score_b", "a_first": [a, b] | None, "b_first": [a, b] | None}],
    "raw": [{"index", "order": "a_first"|"b_first", "reply"}], "judge": {base_url, model, prompt_version}}.
    """
    if not len(questions) == len(answers_a) == len(answers_b):
        raise ValueError(f"{len(questions)} questions, {len(answers_a)} answers A, {len(answers_b)} answers B")
    client = JudgeClient(config)
    client.reserve(2 * len(questions))
    items, raw, failures = [], [], 0
    for i, (q, a, b) in enumerate(zip(questions, answers_a, answers_b)):
        scores = {}
        for order, first, second in (("a_first", a, b), ("b_first", b, a)):
            reply = client.chat(_messages(q, first, second))
            raw.append({"index": i, "order": order, "reply": reply})
            s = parse_scores(reply)
            failures += s is None
            # back to (score of A, score of B) whichever position A had
            scores[order] = None if s is None else (list(s) if order == "a_first" else [s[1], s[0]])
        both = scores["a_first"] is not None and scores["b_first"] is not None
        items.append({
            "index": i,
            "score_a": (scores["a_first"][0] + scores["b_first"][0]) / 2 if both else None,
            "score_b": (scores["a_first"][1] + scores["b_first"][1]) / 2 if both else None,
            **scores,
        })
    scored = [it for it in items if it["score_a"] is not None]
    return {
        "mean_a": _mean([it["score_a"] for it in scored]),
        "mean_b": _mean([it["score_b"] for it in scored]),
        "n": len(items),
        "n_scored": len(scored),
        "parse_failures": failures,
        "requests": client.sent,
        "items": items,
        "raw": raw,
        "judge": {"base_url": config.base_url, "model": config.model, "prompt_version": PROMPT_VERSION},
    }


def judge_generations(compressed: list[dict], dense: list[dict], config: JudgeConfig) -> dict:
    """judge_pairwise over two `evaluate_kick` generation lists (A = compressed, B = dense), matched by id."""
    by_id = {g["id"]: g for g in dense}
    missing = [g["id"] for g in compressed if g["id"] not in by_id]
    if missing:
        raise ValueError(f"dense generations lack ids {missing[:5]}")
    questions = [g.get("question", g["prompt"]) for g in compressed]
    return judge_pairwise(questions, [g["answer"] for g in compressed], [by_id[g["id"]]["answer"] for g in compressed],
                          config)
