"""Tracks 2, 6 and 7 through the real job path: `llmcbench bench --tracks 2,6,7` on the tiny
LLaMA runs one evaluation job per track group (tracks 2, 6, 7 each their own, dense and
compressed), and the bench report scores OM_gen, OM_trust and OM_kick from them."""

from __future__ import annotations

import json
from pathlib import Path

from llmcbench.driver.profiles import PROFILES
from llmcbench.tracks.scoring import METRICS


def test_bench_tracks_2_6_7_end_to_end(tmp_path, tiny_llama_dir, run_cli):
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
