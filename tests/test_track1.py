"""Track 1: lm-eval accuracies on stock task definitions and WikiText-2 perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llmcbench.tracks.performance import (
    TRACK1_TASKS,
    WIKITEXT2,
    build_task_configs,
    evaluate_tasks,
    load_stock_config,
    stock_yaml_path,
    wikitext2_ppl,
)

ALL = ["mmlu", "arc_c", "arc_e", "hellaswag", "piqa", "winogrande", "qnli", "mnli"]
OFFLINE_OVERRIDES = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
                     "test_split", "fewshot_split", "process_docs", "num_fewshot"}


def _load(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return _load(tiny_llama_dir)


@pytest.fixture(scope="module")
def embedded(embedded_model_dir):
    return _load(embedded_model_dir)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- task configs


def test_table_is_the_paper_setup():
    assert list(TRACK1_TASKS) == ALL
    assert {n: s.metric for n, s in TRACK1_TASKS.items()} == {
        "mmlu": "acc", "arc_c": "acc_norm", "arc_e": "acc_norm", "hellaswag": "acc_norm",
        "piqa": "acc_norm", "winogrande": "acc", "qnli": "acc", "mnli": "acc",
    }
    assert TRACK1_TASKS["mnli"].split == "validation_mismatched"
    assert TRACK1_TASKS["qnli"].split == "validation"


def test_online_configs_are_the_stock_ones_unchanged():
    for name, spec in TRACK1_TASKS.items():
        built = build_task_configs(spec, data_dir=None)
        if name == "mmlu":
            assert len(built) == 57
            assert {b.data for b in built} == {f"hub:cais/mmlu/{b.subject}" for b in built}
        else:
            assert len(built) == 1
        for b in built:
            stock = load_stock_config(b.stock_yaml)
            assert {k: v for k, v in b.config.items() if k != "num_fewshot"} == stock
            assert b.data.startswith(f"hub:{spec.hub_id}/")


def test_offline_configs_are_stock_plus_data_overrides(data_dir):
    for name, spec in TRACK1_TASKS.items():
        for b in build_task_configs(spec, data_dir=data_dir):
            stock = load_stock_config(b.stock_yaml)
            cfg = b.config
            # everything that defines the task (prompt, choices, target, metrics, ...) is stock
            for key in set(stock) - OFFLINE_OVERRIDES:
                assert cfg[key] == stock[key], (name, key)
            if name == "mmlu":  # the stock subject task, filtered to its subject in the shared slice
                pd = cfg["process_docs"]
                assert pd.keywords == {"field": "subject", "subject": b.subject, "then": stock.get("process_docs")}
            else:
                assert cfg.get("process_docs") is stock.get("process_docs")
            # the data comes from data_dir, under the split the stock task evaluates
            assert cfg["dataset_path"] == "json" and cfg["dataset_name"] is None
            files = cfg["dataset_kwargs"]["data_files"]
            assert spec.split in files
            assert (cfg.get("test_split") or cfg.get("validation_split")) == spec.split
            for f in files.values():
                assert Path(f).is_file() and Path(f).resolve().is_relative_to(data_dir.resolve())
            assert b.data == "local:" + Path(files[spec.split]).relative_to(data_dir.resolve()).as_posix()


def test_stock_prompts_literally(data_dir):
    """Spot checks against the stock YAML text, independent of the loader."""
    tasks_dir = stock_yaml_path("arc/arc_easy.yaml").parent.parent
    arc = build_task_configs(TRACK1_TASKS["arc_e"], data_dir=data_dir)[0].config
    assert arc["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert arc["doc_to_choice"] == "{{choices.text}}"
    assert 'doc_to_text: "Question: {{question}}\\nAnswer:"' in (tasks_dir / "arc/arc_easy.yaml").read_text()
    qnli = build_task_configs(TRACK1_TASKS["qnli"], data_dir=data_dir)[0].config
    assert qnli["doc_to_choice"] == ["yes", "no"]
    mnli = build_task_configs(TRACK1_TASKS["mnli"], data_dir=data_dir)[0].config
    assert mnli["task"] == "mnli_mismatch" and mnli["doc_to_choice"] == ["True", "Neither", "False"]
    assert mnli["doc_to_text"].__code__.co_filename == str(tasks_dir / "glue/mnli/utils.py")
    wino = build_task_configs(TRACK1_TASKS["winogrande"], data_dir=data_dir)[0].config
    assert wino["doc_to_choice"].__code__.co_filename == str(tasks_dir / "winogrande/preprocess_winogrande.py")
    hs = build_task_configs(TRACK1_TASKS["hellaswag"], data_dir=data_dir)[0].config
    assert hs["process_docs"].__code__.co_filename == str(tasks_dir / "hellaswag/utils.py")
    mmlu = build_task_configs(TRACK1_TASKS["mmlu"], data_dir=data_dir)
    assert [b.subject for b in mmlu] == ["abstract_algebra", "anatomy", "high_school_computer_science", "world_religions"]
    assert mmlu[1].config["description"].startswith("The following are multiple choice questions (with answers) about anatomy.")
    assert mmlu[1].config["doc_to_choice"] == ["A", "B", "C", "D"]


def test_few_shots_never_come_from_the_scored_questions(data_dir, tmp_path):
    """MMLU 5-shot on a slice without its dev file: lm-eval would take the shots from the test
    split and keep the question itself among them (its first_n sampler drops it only where the
    few-shot split is named as the test split), so building the task is a one-line error;
    with dev the shots are dev's, and 0-shot needs no dev."""
    spec = TRACK1_TASKS["mmlu"]
    test_only = spec.local_file(tmp_path, spec.split)
    test_only.parent.mkdir(parents=True)
    test_only.write_bytes(spec.local_file(data_dir, spec.split).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"mmlu: 5-shot needs a few-shot split .*dev\.jsonl is missing"):
        build_task_configs(spec, data_dir=tmp_path, num_fewshot=5)
    assert all(b.config["num_fewshot"] == 0 for b in build_task_configs(spec, data_dir=tmp_path, num_fewshot=0))
    shots = build_task_configs(spec, data_dir=data_dir, num_fewshot=5)
    assert {b.config["fewshot_split"] for b in shots} == {"dev"} and {b.config["test_split"] for b in shots} == {"test"}


def test_lm_eval_builds_the_offline_tasks_on_the_slices(data_dir):
    """lm-eval itself turns the configs into tasks whose docs are the slice's rows."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_defaults=False)
    for name in ("arc_e", "mnli", "mmlu"):
        spec = TRACK1_TASKS[name]
        rows = _jsonl(spec.local_file(data_dir))
        for b in build_task_configs(spec, data_dir=data_dir)[:2]:
            task = tm.load([b.config])["tasks"][b.task]
            docs = list(task.eval_docs)
            expect = [r for r in rows if b.subject is None or r["subject"] == b.subject]
            assert len(docs) == len(expect) > 0
            assert docs[0] == expect[0]
            if name == "arc_e":
                assert task.doc_to_text(docs[0]) == f"Question: {expect[0]['question']}\nAnswer:"
                assert task.doc_to_choice(docs[0]) == expect[0]["choices"]["text"]
            if name == "mmlu":
                assert task.doc_to_target(docs[0]) == expect[0]["answer"]


def test_unknown_dataset_rejected(tiny):
    with pytest.raises(ValueError, match="unknown"):
        evaluate_tasks(*tiny, tasks=["boolq"], data_dir=None, limit=1)


# ---------------------------------------------------------------- evaluation


def test_offline_evaluate_all_datasets_on_tiny_model(tiny, data_dir):
    limit = 3
    res = evaluate_tasks(*tiny, tasks=ALL, data_dir=data_dir, limit=limit, batch_size=16)
    assert list(res) == ALL
    for name, r in res.items():
        spec = TRACK1_TASKS[name]
        assert 0.0 <= r["accuracy_pct"] <= 100.0
        assert r["metric"] == spec.metric
        assert r["data"] == "local:" + spec.local_file(data_dir).relative_to(data_dir).as_posix()
        # MMLU: limit applies per subject task, 4 subjects in the slice
        assert r["n"] == (limit * 4 if name == "mmlu" else limit)
        correct = r["accuracy_pct"] * r["n"] / 100
        assert abs(correct - round(correct)) < 1e-6  # a count of right answers
        assert r["num_fewshot"] == 0
        assert r["requests"] >= 2 * r["n"]
    assert res["mnli"]["lm_eval_task"] == "mnli_mismatch"
    assert res["arc_c"]["lm_eval_task"] == "arc_challenge"
    assert res["mnli"]["requests"] == 3 * limit and res["qnli"]["requests"] == 2 * limit
    assert res["mmlu"]["requests"] == 4 * 4 * limit
    subj = res["mmlu"]["subjects"]
    assert len(subj) == 4 and all(s["n"] == limit for s in subj.values())
    micro = sum(s["accuracy_pct"] * s["n"] for s in subj.values()) / sum(s["n"] for s in subj.values())
    assert res["mmlu"]["accuracy_pct"] == pytest.approx(micro)


def test_embedded_model_beats_chance_on_arc_easy(embedded, data_dir):
    res = evaluate_tasks(*embedded, tasks=["arc_e"], data_dir=data_dir, limit=20)["arc_e"]
    assert res["n"] == 20 and res["metric"] == "acc_norm"
    # chance is 25% (5/20); SmolLM2-135M gets 40% here (8/20)
    assert res["accuracy_pct"] >= 35.0, res


# ---------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def short_wikitext(tmp_path_factory, data_dir):
    """A data_dir with the first 60 WikiText-2 rows, same layout."""
    root = tmp_path_factory.mktemp("wt")
    src = WIKITEXT2.local_file(data_dir)
    dst = WIKITEXT2.local_file(root)
    dst.parent.mkdir(parents=True)
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:60]), encoding="utf-8")
    return root


def _reference_ppl(model, tok, texts, seqlen, max_windows=None):
    """Straightforward: HF's own shifted loss per window, averaged, exponentiated."""
    import torch

    ids = tok("\n\n".join(texts))["input_ids"]
    n = len(ids) // seqlen
    n = n if max_windows is None else min(n, max_windows)
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = torch.tensor([ids[i * seqlen : (i + 1) * seqlen]])
            losses.append(model(input_ids=w, labels=w).loss.item())
    return math.exp(sum(losses) / len(losses)), len(ids)


def test_ppl_matches_independent_computation(tiny, short_wikitext):
    model, tok = tiny
    texts = [r["text"] for r in _jsonl(WIKITEXT2.local_file(short_wikitext))]
    seqlen = 128
    out = wikitext2_ppl(model, tok, data_dir=short_wikitext, seqlen=seqlen)
    ref, ntok = _reference_ppl(model, tok, texts, seqlen)
    assert out["tokens"] == ntok
    assert out["windows"] == out["windows_total"] == ntok // seqlen >= 3
    assert out["seqlen"] == seqlen
    assert out["ppl"] == pytest.approx(ref, rel=1e-4)
    assert out["data"] == "local:hf/Salesforce__wikitext/wikitext-2-raw-v1/test.jsonl"
    # a random model is close to uniform over the vocabulary
    vocab = model.config.vocab_size
    assert vocab / 2 < out["ppl"] < 2 * vocab
    part = wikitext2_ppl(model, tok, data_dir=short_wikitext, seqlen=seqlen, max_windows=2)
    assert part["windows"] == 2 and part["windows_total"] == out["windows"]
    assert part["ppl"] == pytest.approx(_reference_ppl(model, tok, texts, seqlen, max_windows=2)[0], rel=1e-4)
    with pytest.raises(ValueError):
        wikitext2_ppl(model, tok, data_dir=short_wikitext, seqlen=ntok + 1)


def test_embedded_model_ppl_is_a_real_lm(embedded, tiny, data_dir):
    out = wikitext2_ppl(*embedded, data_dir=data_dir, seqlen=512, max_windows=4)
    assert out["windows"] == 4 and out["windows_total"] == out["tokens"] // 512
    assert out["tokens"] > 250_000  # the whole test split was tokenized
    assert math.isfinite(out["ppl"]) and 8 < out["ppl"] < 60, out  # SmolLM2-135M: about 30
    rnd = wikitext2_ppl(*tiny, data_dir=data_dir, seqlen=512, max_windows=1)
    assert out["ppl"] < rnd["ppl"] / 100


def test_mmlu_five_shot_uses_the_subjects_dev_rows(data_dir):
    from lm_eval.tasks import TaskManager

    spec = TRACK1_TASKS["mmlu"]
    dev = _jsonl(spec.local_file(data_dir, "dev"))
    b = build_task_configs(spec, data_dir=data_dir, num_fewshot=5)[1]  # anatomy
    assert b.config["num_fewshot"] == 5 and b.config["fewshot_split"] == "dev"
    task = TaskManager(include_defaults=False).load([b.config])["tasks"][b.task]
    doc = task.eval_docs[0]
    ctx = task.fewshot_context(doc, num_fewshot=5)
    mine = [r["question"] for r in dev if r["subject"] == "anatomy"]
    other = [r["question"] for r in dev if r["subject"] != "anatomy"]
    assert len(mine) == 5 and all(q.strip() in ctx for q in mine)
    assert not any(q.strip() in ctx for q in other)
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.")
    assert ctx.endswith(f"{doc['question'].strip()}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}\n"
                        f"C. {doc['choices'][2]}\nD. {doc['choices'][3]}\nAnswer:")
