"""Track 7 (LLM-KICK): answer metrics, prompts, real runs, and the pairwise judge client."""

from __future__ import annotations

import math
import socket
import time

import pytest
from pydantic import ValidationError

from llmcbench.tracks.kick import (
    JudgeConfig,
    JudgeError,
    evaluate_kick,
    exact_match,
    f1,
    judge_generations,
    judge_pairwise,
    kick_match,
    normalize_answer,
)
from llmcbench.tracks.kick import data as kdata
from llmcbench.tracks.kick.generate import factoid_prompt, greedy_generate, icr_prompt, truncate_tokens
from llmcbench.tracks.kick.judge import JudgeClient, parse_scores
from llmcbench.tracks.kick.metrics import best, first_line, stderr_pct

METRICS = ["kick_factoid_em", "kick_mcqa_acc", "kick_icr_em", "kick_icr_f1"]


def _load(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- metrics


def test_normaliser_em_f1_on_known_strings():
    assert normalize_answer("The Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("  An  apple_pie, a day ") == "apple pie day"
    assert normalize_answer("‘Hamlet’") == "hamlet"
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower, Paris", "eiffel tower") == 0.0
    assert f1("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)  # P 2/2, R 2/4
    assert f1("dog", "cat") == 0.0 and f1("", "cat") == 0.0
    assert f1("Eiffel Tower", "the eiffel tower") == 1.0
    # LLM-KICK's lenient rule: either normalised string inside the other
    assert kick_match("Eiffel Tower, Paris", "the Eiffel Tower") == 1.0
    assert kick_match("Paris", "paris france") == 1.0
    assert kick_match("", "paris") == 0.0 and kick_match("London", "paris") == 0.0
    assert best(exact_match, "Paris", ["Lyon", "paris."]) == 1.0 and best(exact_match, "x", []) == 0.0
    assert first_line("  \n Ghana.\nNext question") == "Ghana."
    assert stderr_pct([1.0, 0.0, 1.0, 0.0]) == pytest.approx(100 * math.sqrt(1 / 3 / 4))


def test_alias_matching_on_real_slice_rows(data_dir, shared_dir):
    fb, source = kdata.load_freebaseqa(data_dir, 2)
    assert source == "local:freebaseqa/eval.jsonl" and len(fb) == 2
    assert fb[0]["question"].startswith("100 pesewas equalling 1 cedi") and fb[0]["references"] == ["ghana"]
    assert best(exact_match, "Ghana.", fb[0]["references"]) == 1.0
    assert best(exact_match, "Nigeria", fb[0]["references"]) == 0.0
    assert best(exact_match, "Midway", fb[1]["references"]) == 1.0
    assert best(exact_match, "Midway Games", fb[1]["references"]) == 0.0
    assert best(kick_match, "Midway Games", fb[1]["references"]) == 1.0

    # ../shared/data holds the same slice under its manifest's name: a --data-dir there reads it too
    shared, source = kdata.load_freebaseqa(shared_dir / "data", 2)
    assert source == "local:freebaseqa/freebaseqa_eval_first200.jsonl" and shared == fb

    tq, source = kdata.load_triviaqa(data_dir, 1)
    assert source == "local:hf/mandarjoshi__trivia_qa/rc.nocontext/validation.jsonl"
    item = tq[0]
    assert item["id"] == "tc_1250" and "evidence" not in item
    assert "Martina Hingis" in item["references"] and "martina hingisova" in item["references"]
    assert best(exact_match, "Martina Hingis", item["references"]) == 1.0
    assert best(exact_match, "hingis.", item["references"]) == 1.0
    assert best(exact_match, "Steffi Graf", item["references"]) == 0.0
    assert best(f1, "Martina Navratilova", item["references"]) == pytest.approx(0.5)


def test_prompts(tiny_llama_dir):
    from transformers import AutoTokenizer

    assert factoid_prompt("Who?") == "Please give answer to this question: Who?\nThe answer is "
    assert icr_prompt("Who?") == "Answer these questions:\n\nQ: Who?\nA:"
    assert icr_prompt("Who?", "Some text.") == "Some text.\n\nBased on these texts, answer these questions:\n\nQ: Who?\nA:"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    long = " ".join(f"word{i}" for i in range(500))
    cut = truncate_tokens(tok, long, 40)
    assert long.startswith(cut) and len(tok(cut, add_special_tokens=False)["input_ids"]) <= 40
    assert truncate_tokens(tok, "short text", 40) == "short text"


# ---------------------------------------------------------------- evaluation


def _check_result(res, data_dir, *, limit, instruction):
    assert set(res) == {*METRICS, "generations", "details", "notes"}
    for name in METRICS:
        assert 0.0 <= res[name] <= 100.0, (name, res[name])
        assert res["details"][name]["data"].startswith("local:")
    d = res["details"]
    assert d["kick_factoid_em"]["n"] == d["kick_icr_em"]["n"] == d["kick_icr_f1"]["n"] == limit
    assert d["kick_mcqa_acc"]["n"] == 4 * limit and d["kick_mcqa_acc"]["num_fewshot"] == 5  # 4 MMLU subjects
    assert d["kick_icr_em"]["setting"] == "closed_book"
    assert d["kick_factoid_em"]["data"] == "local:freebaseqa/eval.jsonl"
    gens = res["generations"]
    assert set(gens) == ({"factoid", "icr", "instruction"} if instruction else {"factoid", "icr"})
    for task in ("factoid", "icr"):
        assert len(gens[task]) == limit
        for g in gens[task]:
            assert {"id", "prompt", "answer", "references"} <= set(g) and g["references"]
            assert g["answer"] == first_line(g["output"])
    assert gens["factoid"][0]["references"] == ["ghana"]
    assert gens["icr"][0]["prompt"] == icr_prompt(gens["icr"][0]["prompt"].split("Q: ")[1].split("\nA:")[0])
    notes = " ".join(res["notes"])
    assert "closed-book" in notes and "mandarjoshi/trivia_qa" in notes
    assert "no judge configured" in notes and "CNN/DailyMail" in notes
    # recomputing the metric from the stored generations gives the reported number
    em = [best(exact_match, g["answer"], g["references"]) for g in gens["icr"]]
    assert res["kick_icr_em"] == pytest.approx(100 * sum(em) / len(em))


def test_evaluate_kick_on_tiny_model(tiny_llama_dir, data_dir):
    model, tok = _load(tiny_llama_dir)
    res = evaluate_kick(model, tok, data_dir=data_dir, limit=3, max_new_tokens=4, instruction=True,
                        instruction_max_new_tokens=4)
    _check_result(res, data_dir, limit=3, instruction=True)
    instr = res["generations"]["instruction"]
    assert [g["id"] for g in instr] == [1, 2, 3] and instr[0]["prompt"].startswith("<|im_start|>")
    assert res["details"]["kick_instruction"] == {"n": 3, "data": "local:llm_kick/mt_question.jsonl",
                                                  "scored": False, "max_new_tokens": 4}
    assert tok.padding_side == "right"  # generation's left padding was undone


def test_open_book_icr_path(tiny_llama_dir, monkeypatch):
    """The online (hub) ICR-QA setting without the network: hub-shaped rows, evidence cut to a token budget."""
    from llmcbench.tracks.kick import evaluate as kevaluate

    row = {"entity_pages": {"wiki_context": ["Martina Hingis is a Swiss tennis player. " * 50]},
           "search_results": {"search_context": ["Her mother is Melanie Molitor."]}}
    evidence = kdata.kick_evidence(row)
    assert evidence.startswith("Martina Hingis") and evidence.endswith("Her mother is Melanie Molitor.")
    assert kdata.kick_evidence({"entity_pages": {"wiki_context": []}, "search_results": {"search_context": []}}) == ""
    items = [{"id": "q1", "question": "Melanie Molitor is the mom of which tennis world NO 1?",
              "references": ["Martina Hingis"], "evidence": evidence}]
    monkeypatch.setattr(kdata, "load_triviaqa", lambda data_dir, limit: (items, "hub:mandarjoshi/trivia_qa/rc"))
    model, tok = _load(tiny_llama_dir)
    details, records = kevaluate.run_icr(model, tok, data_dir=None, limit=1, batch_size=2, device=None,
                                         max_new_tokens=2, context_tokens=30)
    assert details["kick_icr_em"]["setting"] == "open_book" and details["kick_icr_f1"]["context_tokens"] == 30
    prompt = records[0]["prompt"]
    context = prompt.split("\n\nBased on these texts")[0]
    assert evidence.startswith(context) and len(tok(context, add_special_tokens=False)["input_ids"]) <= 30
    assert prompt.endswith(icr_prompt(items[0]["question"], "")[2:])  # "Based on these texts ... A:"


@pytest.mark.slow
def test_evaluate_kick_on_embedded_model(embedded_model_dir, data_dir):
    model, tok = _load(embedded_model_dir)
    res = evaluate_kick(model, tok, data_dir=data_dir, limit=5, max_new_tokens=16)
    _check_result(res, data_dir, limit=5, instruction=False)
    for name in METRICS:
        assert math.isfinite(res[name])
    # a trained model answers in words, not in empty strings
    assert sum(bool(g["answer"]) for g in res["generations"]["icr"]) >= 3
    # batched greedy decoding (left padding) gives the unbatched answers
    prompts = [g["prompt"] for g in res["generations"]["icr"]]
    single = [greedy_generate(model, tok, [p], max_new_tokens=16, batch_size=1)[0] for p in prompts]
    assert [first_line(s) for s in single] == [g["answer"] for g in res["generations"]["icr"]]


# ---------------------------------------------------------------- judge client


def _a_is_first(prompt: str) -> bool:
    return prompt.index("ANSWER-A") < prompt.index("ANSWER-B")


QUESTIONS = ["Q1: explain gravity", "Q2: write a haiku"]
A = ["ANSWER-A one", "ANSWER-A two"]
B = ["ANSWER-B one", "ANSWER-B two"]


def test_judge_asks_both_orders_deterministically(stub_judge):
    stub_judge.reply_fn = lambda p: "9 3\nfirst is better" if _a_is_first(p) else "3 9\nsecond is better"
    out = judge_pairwise(QUESTIONS, A, B, stub_judge.config())
    assert out["requests"] == len(stub_judge.requests) == 4
    assert out["mean_a"] == 9.0 and out["mean_b"] == 3.0 and out["n_scored"] == 2 and out["parse_failures"] == 0
    assert out["items"][0] == {"index": 0, "score_a": 9.0, "score_b": 3.0, "a_first": [9.0, 3.0], "b_first": [9.0, 3.0]}
    assert [r["order"] for r in out["raw"]] == ["a_first", "b_first"] * 2
    for i, q in enumerate(QUESTIONS):  # each item was asked with A first and with B first
        prompts = [r["body"]["messages"][-1]["content"] for r in stub_judge.requests if q in r["body"]["messages"][-1]["content"]]
        assert sorted(_a_is_first(p) for p in prompts) == [False, True]
        assert all(A[i] in p and B[i] in p for p in prompts)
    for r in stub_judge.requests:
        assert r["path"] == "/v1/chat/completions"
        body = r["body"]
        assert body["model"] == "stub-judge" and body["temperature"] == 0 and body["top_p"] == 1 and body["n"] == 1
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert "Authorization" not in r["headers"]


def test_both_orders_cancel_a_position_bias(stub_judge):
    stub_judge.reply_fn = lambda p: "8 6"  # always prefers whatever is shown first
    out = judge_pairwise(QUESTIONS, A, B, stub_judge.config())
    assert out["mean_a"] == out["mean_b"] == 7.0
    assert out["items"][1]["a_first"] == [8.0, 6.0] and out["items"][1]["b_first"] == [6.0, 8.0]


def test_unparsable_replies_are_counted_not_averaged(stub_judge):
    stub_judge.reply_fn = lambda p: "Both answers are fine." if "Q1" in p else "5, 4"
    out = judge_pairwise(QUESTIONS, A, B, stub_judge.config())
    assert out["parse_failures"] == 2 and out["n_scored"] == 1
    assert out["items"][0]["score_a"] is None and out["mean_a"] == 4.5 and out["mean_b"] == 4.5
    assert parse_scores("7 3\nbecause") == (7.0, 3.0) and parse_scores("8.5,9") == (8.5, 9.0)
    assert parse_scores("11 3") is None and parse_scores("") is None and parse_scores("score: 7") is None


def test_scores_written_out_of_ten_are_read_as_scores_not_as_a_second_score(stub_judge):
    """A judge that writes "8/10 6/10" scores 8 and 6: read with "/" as the separator it was
    (8, 10), every second answer got a 10 and nothing counted as a failure."""
    assert parse_scores("8/10 6/10") == (8.0, 6.0) and parse_scores("8/10, 7.5 / 10\nwhy") == (8.0, 7.5)
    assert parse_scores("9 10/10") == (9.0, 10.0) and parse_scores("8/10") is None and parse_scores("8/100 6") is None
    stub_judge.reply_fn = lambda p: "8/10 6/10"  # prefers whatever is shown first
    out = judge_pairwise(QUESTIONS, A, B, stub_judge.config())
    assert out["parse_failures"] == 0 and out["mean_a"] == out["mean_b"] == 7.0

def test_max_requests_is_enforced_before_sending(stub_judge):
    with pytest.raises(JudgeError, match="budget"):
        judge_pairwise(QUESTIONS, A, B, stub_judge.config(max_requests=3))  # needs 4
    assert stub_judge.requests == []
    client = JudgeClient(stub_judge.config(max_requests=1))
    client.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(JudgeError, match="max_requests=1"):
        client.chat([{"role": "user", "content": "again"}])
    assert len(stub_judge.requests) == 1


def test_api_key_from_environment(stub_judge, monkeypatch):
    monkeypatch.delenv("LLMCBENCH_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="LLMCBENCH_TEST_JUDGE_KEY is not set"):
        judge_pairwise(QUESTIONS, A, B, stub_judge.config(api_key_env="LLMCBENCH_TEST_JUDGE_KEY"))
    monkeypatch.setenv("LLMCBENCH_TEST_JUDGE_KEY", "sk-test")
    judge_pairwise(QUESTIONS[:1], A[:1], B[:1], stub_judge.config(api_key_env="LLMCBENCH_TEST_JUDGE_KEY"))
    assert all(r["headers"]["Authorization"] == "Bearer sk-test" for r in stub_judge.requests)


def test_http_error_is_one_line(stub_judge):
    stub_judge.status = 503
    with pytest.raises(JudgeError) as err:
        judge_pairwise(QUESTIONS, A, B, stub_judge.config())
    assert "HTTP 503" in str(err.value) and "overloaded" in str(err.value) and "\n" not in str(err.value)
    assert len(stub_judge.requests) == 1  # no retries


@pytest.fixture
def silent_server(request):
    """Accepts TCP connections (kernel backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    request.addfinalizer(sock.close)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_silent_server_times_out_in_one_line(silent_server):
    cfg = JudgeConfig(base_url=silent_server, model="m", timeout_s=0.5)
    t0 = time.perf_counter()
    with pytest.raises(JudgeError) as err:
        judge_pairwise(QUESTIONS, A, B, cfg)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "did not answer within timeout_s=0.5" in msg and "\n" not in msg


def test_unreachable_judge_and_bad_config():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError, match="unreachable"):
        judge_pairwise(QUESTIONS, A, B, JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=2))
    with pytest.raises(ValidationError):
        JudgeConfig(base_url="127.0.0.1:8000", model="m")
    with pytest.raises(ValidationError):
        JudgeConfig(base_url="http://x/v1", model="m", max_requests=0)
    with pytest.raises(ValueError, match="2 questions"):
        judge_pairwise(QUESTIONS, A, B[:1], JudgeConfig(base_url="http://x/v1", model="m"))


def test_judge_generations_pairs_by_id(stub_judge):
    stub_judge.reply_fn = lambda p: "9 3" if _a_is_first(p) else "3 9"
    compressed = [{"id": 2, "question": "Q2", "prompt": "<p2>", "answer": "ANSWER-A two"},
                  {"id": 1, "question": "Q1", "prompt": "<p1>", "answer": "ANSWER-A one"}]
    dense = [{"id": 1, "question": "Q1", "prompt": "<p1>", "answer": "ANSWER-B one"},
             {"id": 2, "question": "Q2", "prompt": "<p2>", "answer": "ANSWER-B two"}]
    out = judge_generations(compressed, dense, stub_judge.config())
    assert out["mean_a"] == 9.0 and out["n"] == 2
    first = stub_judge.requests[0]["body"]["messages"][-1]["content"]
    assert "Q2" in first and "ANSWER-A two" in first and "ANSWER-B two" in first
    with pytest.raises(ValueError, match="lack ids"):
        judge_generations(compressed, dense[:1], stub_judge.config())
