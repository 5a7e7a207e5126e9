"""Tracks 2, 6 and 7 through the real job path: `llmcbench bench --tracks 2,6,7` on the tiny
LLaMA runs one evaluation job per track group (tracks 2, 6, 7 each their own, dense and
compressed), and the bench report scores OM_gen, OM_trust and OM_kick from them. Without a
judge, instruction following is not scored and the report says so; with the stub judge on
127.0.0.1 it is judged pairwise against the dense answers and enters OM_kick."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmcbench.driver.profiles import PROFILES
from llmcbench.tracks.scoring import METRICS


def _length_score(answer: str) -> int:
    """The stub judge's rule: a longer answer scores higher (1..10), whatever its position."""
    return 1 + min(9, len(answer.split()) // 4)


def _length_judge(prompt: str) -> str:
    answers = [re.search(rf"\[Answer of Assistant {i}\]\n(.*?)\n\[End of the answer of Assistant {i}\]", prompt, re.S)
               .group(1) for i in (1, 2)]
    return f"{_length_score(answers[0])} {_length_score(answers[1])}\nlength rule"


def test_bench_tracks_2_6_7_end_to_end(tmp_path, tiny_llama_dir, run_cli, stub_judge):
    runs = tmp_path / "runs"
    proc = run_cli("bench", "--method", "wanda", "--model", str(tiny_llama_dir), "--tracks", "2,6,7", "--device", "cpu",
                   "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = json.loads(next(runs.glob("wanda-*/*/bench.json")).read_text())
    assert set(bench["jobs"]) == {"compress", "dense eval", "compressed eval", "dense eval t6", "compressed eval t6",
                                  "dense eval t7", "compressed eval t7"}
    rows = {(r["track"], r["metric"]): r for r in bench["rows"]}
    assert {m for t, m in rows if t == 6} == {m for t, m in METRICS if t == 6}
    assert {m for t, m in rows if t == 7} >= {"kick_factoid_em", "kick_mcqa_acc", "kick_icr_em", "kick_icr_f1"}
    assert (2, "wikitext2_ppl") in rows and (1, "wikitext2_ppl") not in rows
    for (t, m), r in rows.items():
        if t in (6, 7):
            assert 0 <= r["dense"] <= 100 and 0 <= r["compressed"] <= 100, (t, m)
    oms = {o["om"]: o for o in bench["oms"]}
    assert {"om_gen", "om_trust", "om_kick"} <= set(oms)
    assert oms["om_trust"]["n_cells"] == 8
    # a metric the dense model scores 0 on has no ratio: it is left out of OM_kick, and the report says so
    zero = [m for (t, m), r in rows.items() if t == 7 and r["dense"] == 0]
    assert oms["om_kick"]["n_cells"] == 4 - len(zero)
    assert all(any(m in n for n in bench["notes"]) for m in zero)
    assert any("instruction following is not scored: no judge configured" in n for n in bench["notes"])

    quick = PROFILES["quick"]
    for key, limit in (("compressed eval t6", quick.trust_limit), ("compressed eval t7", quick.kick_limit)):
        run_dir = Path(bench["jobs"][key]["run_dir"])
        job = json.loads((run_dir / "job.json").read_text())
        assert job["evaluation"]["limit"] == limit
        metrics = json.loads((run_dir / "result.json").read_text())["metrics"]
        details = metrics[f"track{key[-1]}"]["details"]
        assert all(d["n"] <= limit * 4 for d in details.values() if isinstance(d, dict) and "n" in d)
    t7 = json.loads((Path(bench["jobs"]["compressed eval t7"]["run_dir"]) / "result.json").read_text())["metrics"]["track7"]
    factoid = t7["generations"]["factoid"]
    assert len(factoid) == quick.kick_limit and all(g["references"] for g in factoid)  # references stored with the answers

    # with a judge: the track-7 evaluations also answer the instruction questions (new jobs),
    # the driver judges them pairwise, and kick_instruction enters OM_kick in % of dense
    stub_judge.reply_fn = _length_judge
    judged = run_cli("bench", "--method", "wanda", "--model", str(tiny_llama_dir), "--tracks", "2,6,7", "--device", "cpu",
                     "--runs-dir", str(runs), "--judge-url", stub_judge.base_url, "--judge-model", "stub-judge")
    assert judged.returncode == 0, judged.stdout[-3000:] + judged.stderr[-3000:]
    bench2 = json.loads(next(runs.glob("wanda-*/*/bench.json")).read_text())
    assert bench2["jobs"]["dense eval t6"]["cached"] and not bench2["jobs"]["dense eval t7"]["cached"]
    t7_dir = Path(bench2["jobs"]["compressed eval t7"]["run_dir"])
    answers = {k: json.loads((Path(bench2["jobs"][k]["run_dir"]) / "result.json").read_text())["metrics"]["track7"]
               ["generations"]["instruction"] for k in ("compressed eval t7", "dense eval t7")}
    n = len(answers["compressed eval t7"])
    assert n == quick.kick_limit and len(stub_judge.requests) == 2 * n  # both orders, nothing more
    assert all(r["body"]["temperature"] == 0 and r["body"]["model"] == "stub-judge" for r in stub_judge.requests)
    judge = json.loads((t7_dir / "judge.json").read_text())
    assert judge["n_scored"] == n and len(judge["raw"]) == 2 * n
    mean = {k: sum(_length_score(g["answer"]) for g in v) / n for k, v in answers.items()}
    rows2 = {(r["track"], r["metric"]): r for r in bench2["rows"]}
    expected = 100 * mean["compressed eval t7"] / mean["dense eval t7"]
    assert rows2[7, "kick_instruction"]["compressed"] == pytest.approx(expected)
    assert rows2[7, "kick_instruction"]["dense"] == 100
    assert {o["om"]: o for o in bench2["oms"]}["om_kick"]["n_cells"] == 5 - len(zero)
    assert not any("no judge configured" in n for n in bench2["notes"])
    rep = run_cli("report", str(runs), "-o", str(tmp_path / "report"))  # the store report reads judge.json too
    assert rep.returncode == 0, rep.stderr[-2000:]
    lines = (tmp_path / "report" / "report.md").read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if "instruction following (judge)" in ln)
    column = [c.strip() for c in lines[at].split("|")].index("instruction following (judge)")
    row = next(ln for ln in lines[at + 1:] if ln.startswith("| wanda"))
    assert row.split("|")[column].strip() == f"{expected:.2f}", (lines[at], row)

    # cached: the same command asks the judge nothing more
    again = run_cli("bench", "--method", "wanda", "--model", str(tiny_llama_dir), "--tracks", "2,6,7", "--device", "cpu",
                    "--runs-dir", str(runs), "--judge-url", stub_judge.base_url, "--judge-model", "stub-judge")
    assert again.returncode == 0 and len(stub_judge.requests) == 2 * n, again.stderr[-2000:]

    # two benches at once, the judgement gone: one asks the judge (slowly), the other waits for it
    # and reads its judge.json, so each pair is judged once, not once per process
    import os
    import subprocess
    import sys
    import time

    (t7_dir / "judge.json").unlink()
    stub_judge.reply_fn = lambda prompt: (time.sleep(0.3), _length_judge(prompt))[1]
    args = [sys.executable, "-m", "llmcbench.driver.cli", "bench", "--method", "wanda", "--model", str(tiny_llama_dir),
            "--tracks", "2,6,7", "--device", "cpu", "--runs-dir", str(runs), "--judge-url", stub_judge.base_url,
            "--judge-model", "stub-judge"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    both = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in both]
    assert [p.returncode for p in both] == [0, 0], [o[1][-2000:] for o in outs]
    assert len(stub_judge.requests) == 4 * n
    assert json.loads((t7_dir / "judge.json").read_text())["n_scored"] == n
