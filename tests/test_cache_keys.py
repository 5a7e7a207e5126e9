"""What enters a job's cache key: the content of the data dir it reads (never its path), and
for track 7's judgement the judge's reply budget.

The benches are only planned (no job runs): a small local model dir (just a config.json) and
tmp copies of the shipped C4 and WikiText-2 slices.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmcbench.driver.bench import JobRun, plan_bench, planned_jobs
from llmcbench.driver.contract import Calibration, EvalSettings, Job, ModelRef, Result, canonical_json, read_record
from llmcbench.driver.fsio import write_record

SLICES = ("hf/allenai__c4/en/train.jsonl", "hf/Salesforce__wikitext/wikitext-2-raw-v1/test.jsonl")
KEYS = ("compress", "dense eval", "compressed eval")


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}\n")
    return d


def _slices(data_dir: Path, dest: Path) -> Path:
    for rel in SLICES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / rel, dest / rel)
    return dest


def _altered(data_dir: Path, dest: Path) -> Path:
    """The reviewer's second data dir: WikiText-2 cut to 100 rows, C4 reversed."""
    _slices(data_dir, dest)
    wiki, c4 = (dest / rel for rel in reversed(SLICES))
    wiki.write_text("".join(wiki.read_text().splitlines(keepends=True)[:100]))
    c4.write_text("".join(reversed(c4.read_text().splitlines(keepends=True))))
    return dest


def _plan(model_dir: Path, data: Path, runs: Path):
    return plan_bench("wanda", None, str(model_dir), "1,3,4", "quick", "reference", "local", runs, str(data), "cpu")


def _hashes(plan) -> dict[str, str]:
    return {p.key: p.job_hash for p in planned_jobs(plan) if p.key in KEYS}


def test_another_data_dir_content_is_another_job(tmp_path, model_dir, data_dir):
    a = _slices(data_dir, tmp_path / "dataA")
    b = _altered(data_dir, tmp_path / "dataB")
    ha, hb = _hashes(_plan(model_dir, a, tmp_path / "runs")), _hashes(_plan(model_dir, b, tmp_path / "runs"))
    assert set(ha) == set(KEYS)
    for key in KEYS:
        assert ha[key] != hb[key], key
    # one file changed is enough, for the calibration the compress job reads too
    c = _slices(data_dir, tmp_path / "dataC")
    with open(c / SLICES[0], "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    hc = _hashes(_plan(model_dir, c, tmp_path / "runs"))
    assert all(hc[key] != ha[key] for key in KEYS)


def test_the_same_content_elsewhere_is_the_same_job(tmp_path, model_dir, data_dir):
    a = _slices(data_dir, tmp_path / "dataA")
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, moved)  # other path, other mtimes, same bytes
    plan_a, plan_moved = _plan(model_dir, a, tmp_path / "runs"), _plan(model_dir, moved, tmp_path / "runs2")
    assert _hashes(plan_a) == _hashes(plan_moved)
    jobs = {p.key: p.job for p in planned_jobs(plan_a)}
    digest = jobs["compress"].calibration.data_dir_sha256
    assert digest and len(digest) == 64
    assert jobs["dense eval"].evaluation.data_dir_sha256 == digest
    for job in jobs.values():  # the digest is what identifies the data; the dir's path never enters the hash
        assert str(a) not in canonical_json(job.identity_dict())


def _linked(target: Path, dest: Path) -> Path:
    (dest / "hf").mkdir(parents=True)
    for name in ("allenai__c4", "Salesforce__wikitext"):
        os.symlink(target / "hf" / name, dest / "hf" / name)
    return dest


def test_a_folder_linked_into_the_data_dir_counts_by_its_content(tmp_path, model_dir, data_dir):
    """The digest's walk does not enter linked folders: their content must still count (and
    links to the same content elsewhere are the same job)."""
    target = _slices(data_dir, tmp_path / "target")
    linked = _linked(target, tmp_path / "linked")
    before = _hashes(_plan(model_dir, linked, tmp_path / "runs"))
    other = _linked(_slices(data_dir, tmp_path / "target2"), tmp_path / "linked2")
    assert before == _hashes(_plan(model_dir, other, tmp_path / "runs"))
    c4 = target / SLICES[0]
    c4.write_text("".join(reversed(c4.read_text().splitlines(keepends=True))))
    after = _hashes(_plan(model_dir, linked, tmp_path / "runs"))
    assert all(after[key] != before[key] for key in KEYS)


def test_jobs_without_a_data_digest_keep_their_hashes(tmp_path):
    """Hub jobs carry no digest: their hashes are the ones the contract gave before the field
    (figures from the version without it). Job records of either version load."""
    model = ModelRef(name="m", source="local", identity="sha256:abc", path="/somewhere/m")
    ev = Job(kind="eval", method="dense", model=model,
             evaluation=EvalSettings(tracks=[1, 4], tasks=["arc_e"], limit=5, data_source="hub"))
    comp = Job(kind="compress", method="wanda", preset="2:4", params={"sparsity": 0.5}, model=model,
               calibration=Calibration(nsamples=16, seqlen=128, seed=0, source="hub"))
    assert ev.job_hash("env") == "3322e88f5af741186a4b131aed1088c02a28bc060c6be2fa8da98e34d28ee8dd"
    assert comp.job_hash("env") == "f34245e59617666fc60e8d41b3a60dc82bddc8e22863e4af9ff533cc04432734"
    old = json.loads(ev.model_dump_json())
    del old["evaluation"]["data_dir_sha256"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert read_record(tmp_path / "old.json", Job) == ev
    new = ev.model_copy(update={"evaluation": ev.evaluation.model_copy(update={"data_source": "local", "data_dir_sha256": "0" * 64})})
    write_record(tmp_path / "new.json", new)
    back = read_record(tmp_path / "new.json", Job)
    assert back == new and back.job_hash("env") == new.job_hash("env") != ev.job_hash("env")


def _judge_plan(tmp_path, max_tokens: int):
    from llmcbench.tracks.kick.judge import JudgeConfig

    gens = [{"id": "q1", "prompt": "p", "question": "q", "answer": "a"}]
    result = Result(job_hash="x", status="ok", started_at="t", finished_at="t", wall_s=0.0,
                    metrics={"track7": {"generations": {"instruction": gens}}})
    runs = {key: JobRun(job=None, job_hash=key[0] * 64, run_dir=tmp_path / key.replace(" ", "_"), result=result, cached=True)
            for key in ("compressed eval t7", "dense eval t7")}
    for r in runs.values():
        r.run_dir.mkdir(exist_ok=True)
    return SimpleNamespace(runs=runs, judge=JudgeConfig(base_url="http://127.0.0.1:9/v1", model="judge", max_tokens=max_tokens))


def test_a_judgement_is_not_reused_under_another_reply_budget(tmp_path, monkeypatch):
    from llmcbench.driver import judging
    from llmcbench.tracks.kick import judge

    calls = []

    def fake_judge(compressed, dense, config):
        calls.append(config.max_tokens)
        return {"score": config.max_tokens}

    monkeypatch.setattr(judge, "judge_generations", fake_judge)
    assert judging.judge_bench(_judge_plan(tmp_path, 256))["score"] == 256
    assert judging.judge_bench(_judge_plan(tmp_path, 256))["score"] == 256  # cached
    assert calls == [256]
    assert judging.judge_bench(_judge_plan(tmp_path, 16))["score"] == 16  # a shorter budget can cut the scores off
    assert calls == [256, 16]
    # neither the timeout nor the request cap changes a reply: still a cache hit
    plan = _judge_plan(tmp_path, 16)
    plan.judge = plan.judge.model_copy(update={"timeout_s": 5.0, "max_requests": 7})
    assert judging.judge_bench(plan)["score"] == 16 and calls == [256, 16]


def test_an_out_of_tree_methods_code_enters_the_source_digest(tmp_path, monkeypatch):
    """A method folder on LLMCBENCH_METHODS_PATH is code the local runner's jobs run: editing it
    must change the jobs' identity (it was a cache hit on the old code's results)."""
    from llmcbench.driver.environment import source_digest

    in_tree = source_digest()
    engine = tmp_path / "ext" / "mymethod" / "reference.py"
    engine.parent.mkdir(parents=True)
    engine.write_text("def compress(model, calibration, params, device):\n    return None\n")
    monkeypatch.setenv("LLMCBENCH_METHODS_PATH", str(tmp_path / "ext"))
    with_ext = source_digest()
    engine.write_text("def compress(model, calibration, params, device):\n    return 1\n")
    edited = source_digest()
    assert len({in_tree, with_ext, edited}) == 3
    monkeypatch.delenv("LLMCBENCH_METHODS_PATH")
    assert source_digest() == in_tree


def test_a_hub_repo_without_safetensors_downloads_its_bin_weights():
    """OPT and ChatGLM2 at the paper's revisions publish pytorch_model*.bin only: asking for
    *.safetensors alone fetched a snapshot without weights. A repo with safetensors gets those
    alone (LLaMA-2 ships both: 13 GB twice otherwise); offline (no file list) the cache decides."""
    from llmcbench.driver.models import download_patterns

    opt = ["config.json", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "vocab.json", "merges.txt"]
    llama = ["config.json", "model-00001-of-00002.safetensors", "pytorch_model-00001-of-00002.bin", "tokenizer.model"]
    assert "pytorch_model*.bin" in download_patterns(opt) and "*.safetensors" not in download_patterns(opt)
    assert "*.safetensors" in download_patterns(llama) and not any(p.endswith(".bin") for p in download_patterns(llama))
    assert "*.safetensors" in download_patterns(None)
    assert "*.py" in download_patterns(opt, code=True) and "*.py" not in download_patterns(opt)
