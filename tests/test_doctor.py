"""`llmcbench doctor`'s verdict on the upstream engine: which methods' original code can run
here (from a checkout under LLMCBENCH_UPSTREAM_DIR or from a method image built with it), and
on which device. Without a GPU it is `--device cpu` only, not "no": the shim runs upstream's
CUDA code on the CPU (the parity runs of all seven did, on this kind of machine)."""

from __future__ import annotations

from llmcbench.driver.doctor import upstream_verdict


def test_upstream_verdict_names_where_each_methods_code_is(tmp_path, monkeypatch):
    (tmp_path / "wanda").mkdir()
    (tmp_path / "wanda" / "main.py").write_text("# a checkout\n")
    (tmp_path / "sparsegpt").mkdir()  # empty: not a checkout
    monkeypatch.setenv("LLMCBENCH_UPSTREAM_DIR", str(tmp_path))

    v = upstream_verdict(["wanda", "gptq", "sparsegpt"], {"gptq"}, cuda=False)
    assert v.usable
    assert f"wanda (checkout {tmp_path / 'wanda'})" in v.why and "gptq (in its image)" in v.why
    assert "--device cpu only" in v.why and "on the GPU" not in v.why
    assert "no upstream code for sparsegpt:" in v.why

    on_gpu = upstream_verdict(["wanda"], set(), cuda=True)
    assert on_gpu.usable and "on the GPU" in on_gpu.why and "--device cpu" not in on_gpu.why


def test_upstream_verdict_without_any_code_is_no_whatever_the_device(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCBENCH_UPSTREAM_DIR", str(tmp_path))
    for cuda in (False, True):
        v = upstream_verdict(["awq", "wanda"], set(), cuda=cuda)
        assert not v.usable and v.why.startswith("no upstream code for awq, wanda:"), v.why
    assert not upstream_verdict([], set(), cuda=True).usable


def test_doctor_cli_shows_the_upstream_checkout(tmp_path, run_cli):
    (tmp_path / "omniquant").mkdir()
    (tmp_path / "omniquant" / "main.py").write_text("# a checkout\n")
    proc = run_cli("doctor", env={"LLMCBENCH_UPSTREAM_DIR": str(tmp_path), "COLUMNS": "400"}, timeout=300)
    row = next(ln for ln in proc.stdout.splitlines() if "engine upstream" in ln)
    assert "yes" in row and "omniquant (checkout" in row, proc.stdout[-3000:]
